//! Fencing against the real PostgreSQL: the claim statement takes only the
//! rows of partitions its relay owns under a live lease, and the lease
//! heartbeat shares and takes over partitions. White-box tests of
//! `claim.rs` and `lease.rs`; they need `DATABASE_URL` (`./dev up`), like
//! the integration tests.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;

use crate::claim::{Claimant, InFlight};
use crate::config::{AfterPublish, PoisonPolicy};

/// `n` pending rows for `topic`, spread over `keys` aggregate ids.
async fn insert_rows(pool: &PgPool, topic: &str, n: i64, keys: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
         SELECT gen_random_uuid(), 'load', 'k' || (g % $3), 'load.row', $1, jsonb_build_object('seq', g) \
         FROM generate_series(1, $2) g ORDER BY g",
    )
    .bind(topic)
    .bind(n)
    .bind(keys)
    .execute(pool)
    .await?;
    Ok(())
}

/// Relay `relay_id`, live for an hour, owning every partition.
async fn own_every_partition(pool: &PgPool, relay_id: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO outbox_relays (relay_id, lease_until) VALUES ($1, now() + interval '1 hour')",
    )
    .bind(relay_id)
    .execute(pool)
    .await?;
    sqlx::query("UPDATE outbox_relay_partitions SET owner = $1")
        .bind(relay_id)
        .execute(pool)
        .await?;
    Ok(())
}

fn claimant(relay_id: &str) -> Claimant<'_> {
    Claimant {
        relay_id,
        partitions: 32,
        exclude: Vec::new(),
        synchronous_commit: true,
        prepared: true,
        in_flight: InFlight::none(),
    }
}

/// Fencing: a claim takes only rows of partitions its relay owns under a
/// live lease; a take-over waits for the old owner's open claims, and the
/// old owner's later claims see the new owner.
#[sqlx::test(migrations = false)]
async fn claims_are_fenced_by_partition_ownership(pool: PgPool) -> anyhow::Result<()> {
    use crate::claim::{claim, claim_sql};
    outbox_core::migrate(&pool).await?;
    insert_rows(&pool, "fence", 500, 50).await?;
    let sql = claim_sql(AfterPublish::Delete, PoisonPolicy::BlockKey);
    sqlx::query(
        "INSERT INTO outbox_relays (relay_id, lease_until) VALUES \
           ('A', now() + interval '1 hour'), ('B', now() + interval '1 hour')",
    )
    .execute(&pool)
    .await?;
    sqlx::query("UPDATE outbox_relay_partitions SET owner = 'A' WHERE partition < 16")
        .execute(&pool)
        .await?;
    let in_a: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE outbox_partition(aggregate_id, 32) < 16",
    )
    .fetch_one(&pool)
    .await?;
    assert!(
        in_a > 0 && in_a < 500,
        "keys spread over partitions: {in_a}"
    );

    // A claims only its own partitions' rows; B, owning nothing, claims none.
    let mut a = pool.begin().await?;
    let rows = claim(&mut a, &sql, 1000, &claimant("A")).await?;
    assert_eq!(rows.len() as i64, in_a);
    let mut b = pool.begin().await?;
    assert!(claim(&mut b, &sql, 1000, &claimant("B")).await?.is_empty());
    b.rollback().await?;

    // A's lease runs out while its claim is open: nobody can take its
    // partitions until that claim ends.
    sqlx::query(
        "UPDATE outbox_relays SET lease_until = now() - interval '1 second' WHERE relay_id = 'A'",
    )
    .execute(&pool)
    .await?;
    let take_over = "UPDATE outbox_relay_partitions SET owner = 'B', epoch = epoch + 1 \
        WHERE partition IN (SELECT partition FROM outbox_relay_partitions WHERE owner = 'A' \
                            FOR UPDATE SKIP LOCKED)";
    let taken = sqlx::query(take_over).execute(&pool).await?.rows_affected();
    assert_eq!(taken, 0, "a take-over must wait for the open claim");
    a.rollback().await?;
    // An expired lease alone stops A's claims.
    let mut a = pool.begin().await?;
    assert!(claim(&mut a, &sql, 1000, &claimant("A")).await?.is_empty());
    a.rollback().await?;
    let taken = sqlx::query(take_over).execute(&pool).await?.rows_affected();
    assert_eq!(taken, 16, "taken over once the claim ended");
    let mut b = pool.begin().await?;
    assert_eq!(
        claim(&mut b, &sql, 1000, &claimant("B")).await?.len() as i64,
        in_a
    );
    b.rollback().await?;

    // A take-over in progress while A (live again) claims: A's claim waits
    // for it and then sees the new owner.
    sqlx::query("UPDATE outbox_relays SET lease_until = now() + interval '1 hour'")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE outbox_relay_partitions SET owner = 'A' WHERE partition < 16")
        .execute(&pool)
        .await?;
    let mut stealer = pool.begin().await?;
    sqlx::query(take_over).execute(&mut *stealer).await?;
    let racing = {
        let pool = pool.clone();
        let sql = sql.clone();
        tokio::spawn(async move {
            let mut a = pool.begin().await?;
            let n = claim(&mut a, &sql, 1000, &claimant("A")).await?.len();
            a.rollback().await?;
            anyhow::Ok(n)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!racing.is_finished(), "A's claim waits for the take-over");
    stealer.commit().await?;
    assert_eq!(racing.await??, 0, "A sees the new owner and claims nothing");

    // Partitions being released are left out.
    let mut b = pool.begin().await?;
    let mut who = claimant("B");
    who.exclude = (0..16).collect();
    assert!(claim(&mut b, &sql, 1000, &who).await?.is_empty());
    b.rollback().await?;
    Ok(())
}

/// The claim that overlaps a batch in flight (the relay's prefetch) takes no
/// row locks: it leaves out exactly the in-flight batch's ids, never waits on
/// them, and still takes an earlier row whose transaction committed after the
/// first claim, first, in id order.
#[sqlx::test(migrations = false)]
async fn an_overlapping_claim_skips_the_batch_in_flight_and_no_late_row(
    pool: PgPool,
) -> anyhow::Result<()> {
    use crate::claim::{claim, claim_sql, InFlight};
    outbox_core::migrate(&pool).await?;
    own_every_partition(&pool, "A").await?;
    let modes = [
        claim_sql(AfterPublish::Delete, PoisonPolicy::BlockKey),
        claim_sql(
            AfterPublish::Mark {
                retention: Duration::from_secs(60),
            },
            PoisonPolicy::SkipRow,
        ),
        claim_sql(AfterPublish::Delete, PoisonPolicy::SkipRow),
    ];
    for sql in modes {
        sqlx::query("TRUNCATE outbox").execute(&pool).await?;
        insert_rows(&pool, "overlap", 10, 3).await?;
        // A producer transaction still open: its row takes the next id.
        let mut late = pool.begin().await?;
        sqlx::query(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
             VALUES (gen_random_uuid(), 'load', 'k1', 'load.row', 'late', '{}')",
        )
        .execute(&mut *late)
        .await?;
        insert_rows(&pool, "overlap", 30, 3).await?;

        let mut first = pool.begin().await?;
        let ids: Vec<i64> = claim(&mut first, &sql, 20, &claimant("A"))
            .await?
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids.len(), 20);
        assert_eq!(ids[9] + 2, ids[10], "the open transaction's id is left out");
        let late_id = ids[9] + 1;
        late.commit().await?;

        let mut who = claimant("A");
        who.in_flight = InFlight::of(&ids).context("narrow span")?;
        let mut second = pool.begin().await?;
        let next =
            tokio::time::timeout(Duration::from_secs(5), claim(&mut second, &sql, 100, &who))
                .await
                .context("the overlapping claim waited on the batch in flight")??;
        let next_ids: Vec<i64> = next.iter().map(|r| r.id).collect();
        assert!(
            next_ids.iter().all(|id| !ids.contains(id)),
            "no row of the batch in flight is claimed twice: {next_ids:?}"
        );
        assert_eq!(next_ids.first(), Some(&late_id), "the late row comes first");
        assert_eq!(next.first().and_then(|r| r.topic.as_deref()), Some("late"));
        assert_eq!(
            next_ids.len(),
            41 - 20,
            "every other pending row: {next_ids:?}"
        );
        assert!(next_ids.windows(2).all(|w| w[0] < w[1]), "id order");
        second.rollback().await?;
        first.rollback().await?;
    }
    Ok(())
}

/// The lease heartbeat shares partitions fairly as relays join, and takes a
/// dead relay's partitions over once its lease ran out.
#[sqlx::test(migrations = false)]
async fn leases_share_partitions_and_take_over_from_a_dead_relay(
    pool: PgPool,
) -> anyhow::Result<()> {
    use crate::lease::Leases;
    outbox_core::migrate(&pool).await?;
    let ttl = Duration::from_secs(1);
    let lease = |id: &str| Leases::new(pool.clone(), id.into(), ttl, ttl / 4);
    let (a, b, c) = (lease("A"), lease("B"), lease("C"));
    let owned = |l: &Leases| l.ownership().owned.len();
    a.beat().await?;
    assert_eq!(owned(&a), 32);
    b.beat().await?; // nothing free yet
    assert_eq!(owned(&b), 0);
    a.beat().await?; // gives up its share above 16
    b.beat().await?;
    assert_eq!((owned(&a), owned(&b)), (16, 16));
    c.beat().await?;
    a.beat().await?;
    b.beat().await?;
    c.beat().await?;
    assert_eq!((owned(&a), owned(&b), owned(&c)), (11, 11, 10));
    let rows: Vec<(i32, Option<String>)> =
        sqlx::query_as("SELECT partition, owner FROM outbox_relay_partitions ORDER BY 1")
            .fetch_all(&pool)
            .await?;
    assert!(
        rows.iter().all(|(_, o)| o.is_some()),
        "every partition owned"
    );

    // C dies (stops beating): once its lease ran out, A and B, still
    // beating, take its 10.
    for _ in 0..6 {
        tokio::time::sleep(ttl / 4).await;
        a.beat().await?;
        b.beat().await?;
    }
    assert_eq!((owned(&a), owned(&b)), (16, 16));
    let c_left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_relay_partitions WHERE owner = 'C'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(c_left, 0);

    // A stops cleanly: B takes everything at its next heartbeat.
    a.release_all().await?;
    b.beat().await?;
    assert_eq!(owned(&b), 32);
    Ok(())
}

/// The outbox table's reads so far in this transaction: sequential scans,
/// and rows fetched through an index.
async fn outbox_reads(conn: &mut sqlx::PgConnection) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT seq_scan, idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'outbox'",
    )
    .fetch_one(conn)
    .await?)
}

/// A relay that idled over an empty outbox and then meets a burst plans
/// its claim for the table as it is ([`crate::claim::BEGIN`]): it neither
/// reads the whole table (a generic plan cached while the table was empty)
/// nor every pending row (a fresh plan that believes the statistics of the
/// empty table) to take the oldest.
#[sqlx::test(migrations = false)]
async fn the_claim_is_planned_for_the_table_as_it_is(pool: PgPool) -> anyhow::Result<()> {
    use crate::claim::{claim, claim_sql, BEGIN};
    outbox_core::migrate(&pool).await?;
    // No analyze behind the test's back: the table's statistics stay those
    // of the empty table, as between two autovacuum runs.
    sqlx::query("ALTER TABLE outbox SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await?;
    own_every_partition(&pool, "A").await?;
    sqlx::query("VACUUM ANALYZE outbox").execute(&pool).await?;
    let mut conn = pool.acquire().await?;
    let sql = claim_sql(AfterPublish::Delete, PoisonPolicy::BlockKey);
    // The idle relay: more empty claims than the five after which
    // PostgreSQL may cache a generic plan.
    for _ in 0..8 {
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        assert!(claim(&mut tx, &sql, 100, &claimant("A")).await?.is_empty());
        tx.rollback().await?;
    }
    insert_rows(&pool, "plan", 2000, 200).await?;
    let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
    let (scans, fetched) = outbox_reads(&mut tx).await?;
    let rows = claim(&mut tx, &sql, 100, &claimant("A")).await?;
    let (scans_after, fetched_after) = outbox_reads(&mut tx).await?;
    tx.rollback().await?;
    assert_eq!(rows.len(), 100);
    assert_eq!(
        scans_after - scans,
        0,
        "the claim read the whole outbox table: a plan made for the empty table"
    );
    let read = fetched_after - fetched;
    assert!(
        read <= 300,
        "the claim read {read} of 2,000 pending rows to take the oldest 100"
    );
    Ok(())
}
