//! The WAL source's groundwork against the real PostgreSQL (issue 19):
//! table-less events (`outbox_emit`, `outbox_core::emit`), and the slot's
//! lifecycle with the errors that say what to fix.
//!
//! Logical slots are cluster-wide, so each test names its own, and drops it
//! (a forgotten slot keeps WAL forever). Slot creation waits for running
//! transactions, and the slot-exhaustion test uses every free slot for a
//! moment: the tests of this file run one at a time.

use std::time::Duration;

use integration_tests::{database_url as url_of, drop_test_slots as drop_slots};
use outbox_core::{emit, AppendError, NewEvent};
use outbox_relay::slot::{self, SlotError};
use pgwire_replication::{Lsn, ReplicationClient};
use sqlx::{postgres::PgPoolOptions, PgPool};
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

use integration_tests::test_slot_name as name;

/// The logical decoding messages the slot holds, peeked (not consumed):
/// `(prefix, content)`.
async fn messages(pool: &PgPool, slot: &str, publication: &str) -> Vec<(String, String)> {
    let raw: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', $2, 'messages', 'true') \
         WHERE get_byte(data, 0) = ascii('M')",
    )
    .bind(slot)
    .bind(publication)
    .fetch_all(pool)
    .await
    .unwrap();
    raw.into_iter()
        .map(|m| {
            // 'M', transactional flag, LSN (8), prefix\0, length (4), content.
            let rest = &m[10..];
            let nul = rest.iter().position(|b| *b == 0).unwrap();
            let prefix = String::from_utf8(rest[..nul].to_vec()).unwrap();
            let content = String::from_utf8(rest[nul + 5..].to_vec()).unwrap();
            (prefix, content)
        })
        .collect()
}

#[sqlx::test(migrations = false)]
async fn emitted_events_reach_the_slot_only_if_committed_in_the_documented_format(pool: PgPool) {
    let _one = ONE_AT_A_TIME.lock().await;
    outbox_core::migrate(&pool).await.unwrap();
    let (s, p) = (name("emit"), name("emit"));
    drop_slots(&pool, &[]).await;
    let made = slot::create(&pool, &s, &p).await.unwrap();
    assert!(made.slot && made.publication, "{made:?}");

    let committed = NewEvent::new("order", "o-1", "order.paid")
        .json_payload(&serde_json::json!({"amount": 10}))
        .unwrap()
        .header("tenant", "t-1");
    let mut tx = pool.begin().await.unwrap();
    let id = emit(&mut *tx, &committed).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(id, committed.event_id);
    let rolled_back = NewEvent::new("order", "o-2", "order.paid");
    let mut tx = pool.begin().await.unwrap();
    emit(&mut *tx, &rolled_back).await.unwrap();
    tx.rollback().await.unwrap();

    let got = messages(&pool, &s, &p).await;
    assert_eq!(got.len(), 1, "only the committed event: {got:?}");
    let (prefix, content) = &got[0];
    assert_eq!(prefix, "outbox");
    let v: serde_json::Value = serde_json::from_str(content).unwrap();
    assert_eq!(v["v"], 1);
    assert_eq!(v["event_id"], committed.event_id.to_string());
    assert_eq!(v["aggregate_type"], "order");
    assert_eq!(v["aggregate_id"], "o-1");
    assert_eq!(v["event_type"], "order.paid");
    assert_eq!(v["event_version"], 1);
    assert_eq!(v["topic"], serde_json::Value::Null);
    // jsonb's own rendering, as the outbox row's payload column gives it.
    assert_eq!(v["payload"], r#"{"amount": 10}"#);
    assert_eq!(v["headers"]["tenant"], "t-1");
    assert_eq!(v["content_type"], "application/json");
    assert!(v["occurred_at"].as_str().unwrap().starts_with("20"));

    // Bytes travel as base64, without line breaks however long.
    let big = vec![7u8; 300];
    let bytes = NewEvent::new("order", "o-3", "order.blob")
        .bytes_payload(big.clone(), "application/octet-stream");
    emit(&pool, &bytes).await.unwrap();
    let got = messages(&pool, &s, &p).await;
    let v: serde_json::Value = serde_json::from_str(&got[1].1).unwrap();
    let b64 = v["payload_bytes"].as_str().unwrap();
    assert!(!b64.contains('\n'), "{b64}");
    let decoded: Vec<u8> = sqlx::query_scalar("SELECT decode($1, 'base64')")
        .bind(b64)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(decoded, big);

    // Bad input: refused before the database by the Rust call, and by the
    // SQL function for callers in other languages, naming the field.
    let bad = NewEvent::new("order", " ", "order.paid");
    assert!(matches!(
        emit(&pool, &bad).await,
        Err(AppendError::Invalid {
            field: "aggregate_id",
            ..
        })
    ));
    for (call, says) in [
        (
            "SELECT outbox_emit('order', '', 'order.paid')",
            "aggregate_id must not be empty",
        ),
        (
            "SELECT outbox_emit('order', '1', 'order.paid', event_version => 0)",
            "event_version must be positive",
        ),
        (
            "SELECT outbox_emit('order', '1', 'order.paid', headers => '[1]')",
            "headers must be a JSON object",
        ),
        (
            "SELECT outbox_emit('order', '1', 'x', payload => '{}', payload_bytes => '\\x00')",
            "payload or payload_bytes, not both",
        ),
        (
            "SELECT outbox_emit('order', '1', 'x', topic => '')",
            "topic must be NULL",
        ),
    ] {
        let e = sqlx::query(call).execute(&pool).await.unwrap_err();
        let db = e.as_database_error().unwrap();
        assert_eq!(db.code().as_deref(), Some("23514"), "{call}");
        assert!(db.message().contains(says), "{call}: {}", db.message());
    }
    assert_eq!(
        messages(&pool, &s, &p).await.len(),
        2,
        "nothing more written"
    );

    // Producers in other languages call the SQL function: the same message.
    sqlx::query(
        "SELECT outbox_emit('order', 'o-1', 'order.paid', payload => '{\"amount\": 10}', \
                            headers => '{\"tenant\": \"t-1\"}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let got = messages(&pool, &s, &p).await;
    assert_eq!(got.len(), 3);
    let from_rust: serde_json::Value = serde_json::from_str(&got[0].1).unwrap();
    let from_sql: serde_json::Value = serde_json::from_str(&got[2].1).unwrap();
    let without = |mut v: serde_json::Value| {
        for varying in ["event_id", "occurred_at"] {
            v.as_object_mut().unwrap().remove(varying);
        }
        v
    };
    assert_eq!(
        without(from_rust),
        without(from_sql),
        "{}\n{}",
        got[0].1,
        got[2].1
    );
    drop_slots(&pool, &[&s]).await;
}

#[sqlx::test(migrations = false)]
async fn slot_create_is_idempotent_status_shows_the_kept_wal_and_drop_frees_it(pool: PgPool) {
    let _one = ONE_AT_A_TIME.lock().await;
    outbox_core::migrate(&pool).await.unwrap();
    let (s, p) = (name("life"), name("life"));
    drop_slots(&pool, &[]).await;
    assert!(slot::status(&pool, &s).await.unwrap().is_none());
    assert!(slot::create(&pool, &s, &p).await.unwrap().slot);
    let again = slot::create(&pool, &s, &p).await.unwrap();
    assert!(!again.slot && !again.publication, "{again:?}");
    // Inserts only: the relay's own deletes are not sent back to it.
    assert!(again.extra_actions.is_empty(), "{again:?}");
    let actions: (bool, bool, bool, bool) = sqlx::query_as(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
    )
    .bind(&p)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(actions, (true, false, false, false));
    // A publication made otherwise is named for what it sends besides.
    sqlx::query(&format!(
        "ALTER PUBLICATION \"{p}\" SET (publish = 'insert, delete')"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let extra = slot::create(&pool, &s, &p).await.unwrap().extra_actions;
    assert_eq!(extra, ["delete"]);
    sqlx::query(&format!(
        "ALTER PUBLICATION \"{p}\" SET (publish = 'insert')"
    ))
    .execute(&pool)
    .await
    .unwrap();

    let before = slot::status(&pool, &s).await.unwrap().unwrap();
    assert_eq!(before.plugin, "pgoutput");
    assert!(!before.active);
    for i in 0..200 {
        emit(&pool, &NewEvent::new("order", i.to_string(), "order.paid"))
            .await
            .unwrap();
    }
    let after = slot::status(&pool, &s).await.unwrap().unwrap();
    let (kept, lag) = (after.retained_wal_bytes.unwrap(), after.lag_bytes.unwrap());
    assert!(
        kept > before.retained_wal_bytes.unwrap() && lag > 20_000,
        "200 events are kept for the slot: {before:?} {after:?}"
    );
    assert_eq!(after.confirmed_flush_lsn, before.confirmed_flush_lsn);

    assert!(slot::drop(&pool, &s, Some(&p)).await.unwrap().publication);
    assert!(slot::status(&pool, &s).await.unwrap().is_none());
    let publications: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_publication WHERE pubname = $1")
            .bind(&p)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(publications, 0);
    assert!(matches!(
        slot::drop(&pool, &s, None).await,
        Err(SlotError::NotFound { .. })
    ));
    // The binary says what it dropped, and what it did not find.
    slot::create(&pool, &s, &p).await.unwrap();
    let (code, out) = integration_tests::relay_cli(
        &url_of(&pool),
        &["slot", "drop", "--slot", &s, "--with-publication"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("slot {s} dropped"))
            && out.contains("no publication named outbox_relay (name it with --publication)"),
        "{out}"
    );
    let (code, out) = integration_tests::relay_cli(
        &url_of(&pool),
        &[
            "slot",
            "drop",
            "--slot",
            &s,
            "--publication",
            &p,
            "--with-publication",
        ],
    );
    assert_ne!(code, 0, "the slot is gone: {out}");
    sqlx::query(&format!("DROP PUBLICATION \"{p}\""))
        .execute(&pool)
        .await
        .unwrap();

    // Names from config are checked, then quoted.
    for bad in ["", "Upper", "a-b", "x\"; DROP TABLE outbox; --"] {
        assert!(
            matches!(
                slot::create(&pool, bad, &p).await,
                Err(SlotError::InvalidName { what: "slot", .. })
            ),
            "{bad:?}"
        );
    }
    // A slot of that name made with another plugin is named, not reused.
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'test_decoding')")
        .bind(&s)
        .execute(&pool)
        .await
        .unwrap();
    let e = slot::create(&pool, &s, &p).await.unwrap_err();
    assert!(matches!(&e, SlotError::WrongPlugin { plugin, .. } if plugin == "test_decoding"));
    assert!(e.to_string().contains("slot drop"), "{e}");
    drop_slots(&pool, &[&s]).await;
}

#[sqlx::test(migrations = false)]
async fn a_held_slot_refuses_a_second_reader_and_its_drop_names_the_holder(pool: PgPool) {
    let _one = ONE_AT_A_TIME.lock().await;
    outbox_core::migrate(&pool).await.unwrap();
    let (s, p) = (name("held"), name("held"));
    drop_slots(&pool, &[]).await;
    slot::create(&pool, &s, &p).await.unwrap();
    let target = slot::ReplicationTarget::from_url(&url_of(&pool)).unwrap();

    let mut first = ReplicationClient::connect(target_config(&target, &s, &p))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), first.wait_started())
        .await
        .expect("the first reader starts")
        .unwrap();
    let held = slot::status(&pool, &s).await.unwrap().unwrap();
    assert!(held.active && held.active_pid.is_some(), "{held:?}");

    let e = slot::drop(&pool, &s, None).await.unwrap_err();
    let SlotError::HeldByAnother { pid, holder, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(Some(*pid), held.active_pid);
    assert!(holder.contains("outbox-relay"), "{e}");

    // A second reader is refused by PostgreSQL; the refusal is classified.
    let mut second = ReplicationClient::connect(target_config(&target, &s, &p))
        .await
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), second.recv())
        .await
        .expect("the second reader is refused at once");
    let e = refused.expect_err("a second reader must not stream");
    let classified = slot::explain(e, &target, &s);
    assert!(
        matches!(&classified, SlotError::HeldByAnother { pid: p2, .. } if Some(*p2) == held.active_pid),
        "{classified:?}"
    );
    first.stop();

    let _ = tokio::time::timeout(Duration::from_secs(10), first.shutdown()).await;
    drop(second);
    // The walsender lets go of the slot a moment after the disconnect.
    for _ in 0..100 {
        if !slot::status(&pool, &s).await.unwrap().unwrap().active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop_slots(&pool, &[&s]).await;
}

fn target_config(
    target: &slot::ReplicationTarget,
    slot: &str,
    publication: &str,
) -> pgwire_replication::ReplicationConfig {
    slot::replication_config(target, slot, publication).with_start_lsn(Lsn::ZERO)
}

#[sqlx::test(migrations = false)]
async fn a_role_without_replication_and_a_pooler_are_told_what_to_fix(pool: PgPool) {
    let _one = ONE_AT_A_TIME.lock().await;
    let role = name("norepl");
    sqlx::query(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'pw' NOREPLICATION"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let mut u = url::Url::parse(&url_of(&pool)).unwrap();
    u.set_username(&role).unwrap();
    u.set_password(Some("pw")).unwrap();
    let as_role = PgPoolOptions::new()
        .max_connections(1)
        .connect(u.as_str())
        .await
        .unwrap();
    let e = slot::preflight(&as_role).await.unwrap_err();
    assert!(
        matches!(&e, SlotError::NoReplication { role: r } if *r == role),
        "{e:?}"
    );
    assert!(e.to_string().contains("REPLICATION"), "{e}");
    let e = slot::probe_replication(&slot::ReplicationTarget::from_url(u.as_str()).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, SlotError::NoReplication { .. }), "{e:?}");
    as_role.close().await;
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&pool)
        .await
        .unwrap();

    // PgBouncer (./dev up starts one) refuses replication connections.
    let bouncer = std::env::var("PGBOUNCER_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:6433/postgres".into());
    let e = slot::probe_replication(&slot::ReplicationTarget::from_url(&bouncer).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, SlotError::ThroughPooler { .. }), "{e:?}");
    assert!(e.to_string().contains("direct connection"), "{e}");

    // The URL's password is never shown.
    let target = slot::ReplicationTarget::from_url("postgres://u:s3cret@h:1/d").unwrap();
    assert!(!format!("{target:?}").contains("s3cret"));
}

#[sqlx::test(migrations = false)]
async fn exhausted_slots_are_reported_with_the_limit(pool: PgPool) {
    let _one = ONE_AT_A_TIME.lock().await;
    outbox_core::migrate(&pool).await.unwrap();
    drop_slots(&pool, &[]).await;
    // Take every free slot with temporary ones, on one connection: they
    // vanish with it. (Not until refused: an error drops a session's
    // temporary slots.)
    let mut conn = pool.acquire().await.unwrap();
    let free: i64 = sqlx::query_scalar(
        "SELECT current_setting('max_replication_slots')::int - count(*) FROM pg_replication_slots",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert!((0..1000).contains(&free), "{free} free slots");
    for _ in 0..free {
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput', temporary => true)")
            .bind(name("tmp"))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let (s, p) = (name("full"), name("full"));
    let e = slot::create(&pool, &s, &p).await.unwrap_err();
    let max: String = sqlx::query_scalar("SHOW max_replication_slots")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        matches!(&e, SlotError::SlotsExhausted { max: m } if *m == max),
        "{e:?}"
    );
    assert!(e.to_string().contains("max_replication_slots"), "{e}");
    conn.close().await.unwrap();
    drop_slots(&pool, &[&s]).await;
}

/// A private PostgreSQL cluster with `wal_level = replica` (the default), on
/// a free port, stopped and removed when dropped. Needs PostgreSQL's server
/// binaries (`./dev up` installs them); runs them as `postgres` when root.
struct ReplicaCluster {
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
    port: u16,
}

impl ReplicaCluster {
    fn as_pg(&self, program: &str) -> std::process::Command {
        let path = self.bin.join(program);
        if nix_is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            std::process::Command::new(path)
        }
    }

    fn start() -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()
            .ok_or_else(|| anyhow::anyhow!("no PostgreSQL server binaries; run ./dev up"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("outbox-replica-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if nix_is_root() {
            let ok = std::process::Command::new("chown")
                .arg("postgres")
                .arg(&dir)
                .status()?;
            anyhow::ensure!(ok.success(), "chown postgres {}", dir.display());
        }
        let cluster = Self { bin, dir, port };
        let out = cluster
            .as_pg("initdb")
            .arg("-D")
            .arg(cluster.dir.join("data"))
            .args(["-A", "trust", "-U", "postgres"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = cluster
            .as_pg("pg_ctl")
            .arg("-D")
            .arg(cluster.dir.join("data"))
            .arg("-l")
            .arg(cluster.dir.join("server.log"))
            .arg("-w")
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c wal_level=replica",
                cluster.dir.display()
            ))
            .arg("start")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(cluster.dir.join("server.log")).unwrap_or_default()
        );
        Ok(cluster)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for ReplicaCluster {
    fn drop(&mut self) {
        let _ = self
            .as_pg("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// With `wal_level` below `logical`, every way in says what to change:
/// `slot create`, `outbox_core::emit` and the SQL function `outbox_emit`.
/// A cluster of its own, since changing `wal_level` needs a restart.
#[tokio::test]
async fn a_wrong_wal_level_is_named_with_its_fix_everywhere() -> anyhow::Result<()> {
    let cluster = ReplicaCluster::start()?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&cluster.url())
        .await?;
    outbox_core::migrate(&pool).await?;

    let e = slot::create(&pool, "outbox_relay", "outbox_relay")
        .await
        .expect_err("no slot without wal_level = logical");
    assert!(matches!(e, SlotError::WalLevel { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("wal_level") && text.contains("logical") && text.contains("replica"),
        "{text}"
    );

    let event = NewEvent::new("order", "o-1", "order.paid");
    let e = emit(&pool, &event).await.expect_err("refused");
    assert!(matches!(e, AppendError::WalLevelNotLogical(_)), "{e:?}");
    assert!(e.to_string().contains("wal_level"), "{e}");

    let e = sqlx::query("SELECT outbox_emit('order', 'o-1', 'order.paid')")
        .execute(&pool)
        .await
        .expect_err("refused");
    let db = e.as_database_error().expect("a database error");
    assert_eq!(db.code().as_deref(), Some("55000"), "{db}");
    assert!(db.message().contains("wal_level"), "{}", db.message());

    // The binary, as an operator runs it: a non-zero exit and the fix.
    let (code, out) = integration_tests::relay_cli(&cluster.url(), &["slot", "create"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("wal_level"), "{out}");
    pool.close().await;
    Ok(())
}
