//! [`Leases`]: which relay owns which key partitions.
//!
//! The outbox is split into key partitions: a row belongs to partition
//! `outbox_partition(aggregate_id, n)` (a hash of its Kafka key), where `n` is
//! the number of rows in `outbox_relay_partitions` (32 by default). Every
//! partition has at most one owner, a relay whose lease in `outbox_relays` is
//! live. Each relay runs a heartbeat that, in one transaction:
//!
//! 1. registers the relay and renews its lease (`lease_until = now + ttl`);
//! 2. counts the live relays and works out a fair share, `ceil(n / live)`;
//! 3. releases partitions above its share (so a relay that joins gets work),
//!    and takes free partitions, or those of relays whose lease ran out, up to
//!    its share.
//!
//! **Fencing.** This file is fencing's one home. Ownership is checked inside
//! every claim transaction, not in memory: the claim statement
//! ([`crate::claim::claim_sql`]) starts with [`FENCE`], which locks the relay's
//! partition rows `FOR SHARE` and claims only rows of partitions that the
//! relay owns, under a live lease, at that moment. Taking a partition over or
//! releasing it is an `UPDATE` of its row (after `FOR UPDATE SKIP LOCKED`),
//! which cannot happen while any claim transaction of the old owner still
//! holds its share lock, and a later claim of the old owner sees the new owner
//! and leaves the partition alone. So a relay that lost a partition has
//! committed or rolled back every claim on it before another relay claims it,
//! and no two relays ever have rows of one key in flight at once.
//!
//! A relay that plans to release a partition first stops claiming it
//! ([`Ownership::releasing`]): its claims follow each other back to back
//! under load, and the release waits for a moment when none holds the lock.
//!
//! **Fencing in Kafka (exactly-once mode).** A claim's lock ends when its
//! transaction ends, but a Kafka transaction of the same batch can outlive
//! it (the claim's connection died while the records were in flight, or
//! the database commit failed after the Kafka commit). Two more rules close
//! that gap:
//!
//! - A relay releases a partition only once every batch it claimed before
//!   it stopped claiming that partition is settled in Kafka and in the
//!   database ([`ReleaseGate`]).
//! - A relay that takes a partition over from a relay whose lease ran out
//!   records that relay's id in the partition's `unfenced` list, in the
//!   take-over's own statement. Before claiming from the partition it
//!   fences each listed relay's transactional id in Kafka, which aborts its
//!   open transaction and makes any later commit of it fail, finishes the
//!   database side of that relay's last committed checkpoint, and empties
//!   the list ([`Ownership::recovering`]; `exactly_once.rs` does it). The
//!   fence clause leaves partitions with a non-empty list out of every
//!   claim, and the list outlives a new owner that dies before emptying it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::telemetry;

/// The fence at the head of every claim: the partitions this relay owns right
/// now, under a live lease, minus those it is releasing, each locked
/// `FOR SHARE` until the claim commits or rolls back. A take-over or release
/// updates a partition row, so it waits for (or skips) every open claim on
/// it, and a claim that starts after it sees the new owner (PostgreSQL
/// re-reads a row updated under a lock). It also sets the transaction's
/// `synchronous_commit` (see [`crate::RelayConfig::synchronous_commit`]).
pub(crate) const FENCE: &str = "WITH owned AS MATERIALIZED ( \
      SELECT rp.partition, \
             set_config('synchronous_commit', \
                        CASE WHEN $4 THEN current_setting('synchronous_commit') ELSE 'off' END, true) \
      FROM outbox_relay_partitions rp JOIN outbox_relays r ON r.relay_id = rp.owner \
      WHERE rp.owner = $2 AND r.lease_until > clock_timestamp() AND rp.partition <> ALL($5) \
        AND cardinality(rp.unfenced) = 0 \
      FOR SHARE OF rp) ";

/// What this relay owns, as of its last heartbeat. The claim statement checks
/// ownership again in the database; this view decides whether to claim at
/// all and which partitions to leave out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// Number of partitions the outbox is split into (0 before the first
    /// heartbeat).
    pub partitions: i32,
    /// Partitions this relay owns.
    pub owned: BTreeSet<i32>,
    /// Owned partitions this relay is giving up: claims leave them out.
    pub releasing: BTreeSet<i32>,
    /// Exactly-once mode: owned partitions whose `unfenced` list is not
    /// empty, with the list: relays whose lease ran out while they owned the
    /// partition. Claims leave them out until those relays are fenced in
    /// Kafka and their last checkpoints finished ([`Leases::recovered`]).
    pub recovering: BTreeMap<i32, Vec<String>>,
    /// Relays with a live lease, this one included.
    pub live_relays: i32,
    /// Why the last heartbeat failed, if it did.
    pub last_error: Option<String>,
}

impl Ownership {
    /// Partitions to claim from: owned and not being released.
    pub fn claimable(&self) -> usize {
        self.owned
            .iter()
            .filter(|p| !self.releasing.contains(p) && !self.recovering.contains_key(p))
            .count()
    }

    /// Owned partitions claims leave out: being released or recovered.
    pub fn excluded(&self) -> Vec<i32> {
        self.releasing
            .iter()
            .chain(self.recovering.keys())
            .copied()
            .collect()
    }
}

/// Exactly-once mode: when a partition may be released. Every claim takes a
/// ticket before it reads the ownership it claims by, and the publish loop
/// settles a ticket once its batch is decided in Kafka and finished in the
/// database (tickets settle in order). A partition marked for release when
/// `started` was `n` is released once `settled >= n`: every batch that could
/// hold its rows is over.
#[derive(Debug, Default)]
pub struct ReleaseGate {
    started: AtomicU64,
    settled: AtomicU64,
}

impl ReleaseGate {
    /// A new claim's ticket; take it before reading the ownership.
    pub fn ticket(&self) -> u64 {
        self.started.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The batch of `ticket`, and every earlier one, is settled.
    pub fn settle(&self, ticket: u64) {
        self.settled.fetch_max(ticket, Ordering::SeqCst);
    }

    fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    fn settled(&self) -> u64 {
        self.settled.load(Ordering::SeqCst)
    }
}

/// Why a heartbeat did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The database failed; the heartbeat is retried.
    #[error("database: {}", crate::store::explain(.0))]
    Database(#[from] sqlx::Error),
    /// `outbox_relay_partitions` is empty or not numbered 0..n-1.
    #[error(
        "outbox_relay_partitions must hold the partitions 0..n-1 (it holds {count} rows, \
         numbered {min}..{max}); stop every relay, then refill it (see docs/schema.md in the outbox-toolkit repository)"
    )]
    BadPartitions {
        /// Rows in the table.
        count: i32,
        /// Lowest partition number.
        min: i32,
        /// Highest partition number.
        max: i32,
    },
    /// The number of partitions changed while this relay ran.
    #[error(
        "the number of partitions changed from {was} to {now} while this relay ran; \
         it stopped claiming: restart every relay"
    )]
    PartitionsChanged {
        /// When the relay started.
        was: i32,
        /// Now.
        now: i32,
    },
}

/// The lease keeper of one relay. Build with [`Leases::new`], run
/// [`Leases::run`] as a task; read [`Leases::ownership`] before each claim.
#[derive(Debug)]
pub struct Leases {
    relay_id: String,
    ttl: Duration,
    heartbeat: Duration,
    pool: PgPool,
    state: Mutex<Ownership>,
    /// Exactly-once mode: gate releases on settled batches, and recover
    /// partitions taken over from dead relays before claiming them.
    exactly_once: bool,
    gate: ReleaseGate,
    /// When each partition being released was marked (a gate ticket).
    marked: Mutex<BTreeMap<i32, u64>>,
}

impl Leases {
    /// A lease keeper for `relay_id`, renewing a lease of `ttl` every
    /// `heartbeat`. Every statement runs in a transaction and unnamed, so it
    /// also works through a transaction-mode pooler.
    pub fn new(pool: PgPool, relay_id: String, ttl: Duration, heartbeat: Duration) -> Self {
        Self {
            relay_id,
            ttl,
            heartbeat,
            pool,
            state: Mutex::new(Ownership::default()),
            exactly_once: false,
            gate: ReleaseGate::default(),
            marked: Mutex::new(BTreeMap::new()),
        }
    }

    /// Exactly-once mode (see the module doc): releases wait for the
    /// [`ReleaseGate`], and partitions taken from dead relays are recovered
    /// before they are claimed.
    pub fn exactly_once(mut self) -> Self {
        self.exactly_once = true;
        self
    }

    /// The release gate the publish loop takes and settles tickets of.
    pub fn gate(&self) -> &ReleaseGate {
        &self.gate
    }

    /// The relays listed for these partitions are fenced and their last
    /// checkpoints finished: empties the lists, so claims may take them.
    pub async fn recovered(&self, partitions: &[i32]) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE outbox_relay_partitions SET unfenced = '{}' \
             WHERE owner = $1 AND partition = ANY($2)",
        )
        .persistent(false)
        .bind(&self.relay_id)
        .bind(partitions)
        .execute(&self.pool)
        .await?;
        let mut st = self.state.lock().expect("ownership lock");
        for p in partitions {
            st.recovering.remove(p);
        }
        Ok(())
    }

    /// This relay's id, as stored in `outbox_relays` and as owner.
    pub fn relay_id(&self) -> &str {
        &self.relay_id
    }

    /// A copy of the current view.
    pub fn ownership(&self) -> Ownership {
        self.state.lock().expect("ownership lock").clone()
    }

    /// Runs heartbeats until `shutdown`, then releases every partition and
    /// deregisters, so other relays take over at their next heartbeat.
    /// `wake` is notified whenever partitions were taken over.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>, shutdown: CancellationToken) {
        let mut failing = false;
        while !shutdown.is_cancelled() {
            match self.beat().await {
                Ok(acquired) => {
                    if failing {
                        info!("lease heartbeat recovered");
                        failing = false;
                    }
                    if acquired > 0 {
                        wake.notify_one();
                    }
                }
                Err(e) => {
                    let why = match &e {
                        LeaseError::Database(db) => {
                            let opts = self.pool.connect_options();
                            let why =
                                crate::store::explain_connect(db, opts.get_host(), opts.get_port())
                                    .await;
                            format!("database: {why}")
                        }
                        other => other.to_string(),
                    };
                    if !failing {
                        warn!(error = %why, "lease heartbeat failed; claims stop once the lease runs out");
                    }
                    failing = true;
                    let mut st = self.state.lock().expect("ownership lock");
                    st.last_error = Some(format!("lease heartbeat: {why}"));
                    if matches!(e, LeaseError::PartitionsChanged { .. }) {
                        st.releasing = st.owned.clone();
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.heartbeat) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    /// One heartbeat. Returns how many partitions were taken over.
    pub async fn beat(&self) -> Result<usize, LeaseError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO outbox_relays (relay_id, pid, lease_until) \
             VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
             ON CONFLICT (relay_id) DO UPDATE \
               SET heartbeat_at = clock_timestamp(), lease_until = EXCLUDED.lease_until, pid = EXCLUDED.pid",
        )
        .persistent(false)
        .bind(&self.relay_id)
        .bind(std::process::id() as i32)
        .bind(self.ttl.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM outbox_relay_partitions)::int AS n, \
                    (SELECT COALESCE(min(partition), 0) FROM outbox_relay_partitions) AS min, \
                    (SELECT COALESCE(max(partition), -1) FROM outbox_relay_partitions) AS max, \
                    (SELECT count(*) FROM outbox_relays WHERE lease_until > clock_timestamp())::int AS live, \
                    ARRAY(SELECT partition FROM outbox_relay_partitions WHERE owner = $1 ORDER BY 1) AS owned",
        )
        .persistent(false)
        .bind(&self.relay_id)
        .fetch_one(&mut *tx)
        .await?;
        let n: i32 = row.try_get("n")?;
        let (min, max): (i32, i32) = (row.try_get("min")?, row.try_get("max")?);
        if n == 0 || min != 0 || max != n - 1 {
            return Err(LeaseError::BadPartitions { count: n, min, max });
        }
        let was = self.state.lock().expect("ownership lock").partitions;
        if was != 0 && was != n {
            return Err(LeaseError::PartitionsChanged { was, now: n });
        }
        let live: i32 = row.try_get::<i32, _>("live")?.max(1);
        let mut owned: BTreeSet<i32> = row.try_get::<Vec<i32>, _>("owned")?.into_iter().collect();
        let share = (n + live - 1) / live;

        // Give up what is above the fair share: the highest partitions first.
        let mut releasing: BTreeSet<i32> = {
            let st = self.state.lock().expect("ownership lock");
            st.releasing.intersection(&owned).copied().collect()
        };
        let keep = owned.len().saturating_sub(releasing.len());
        if keep > share as usize {
            let extra = keep - share as usize;
            let give: Vec<i32> = owned
                .iter()
                .rev()
                .filter(|p| !releasing.contains(p))
                .take(extra)
                .copied()
                .collect();
            releasing.extend(give);
        }
        // Tell the claim loop before trying: claims leave these out from now.
        self.state.lock().expect("ownership lock").releasing = releasing.clone();
        let releasable: Vec<i32> = if self.exactly_once {
            // Mark after telling the loop: a claim whose ticket is later
            // read the new set (see ReleaseGate).
            let now = self.gate.started();
            let settled = self.gate.settled();
            let mut marked = self.marked.lock().expect("release marks");
            marked.retain(|p, _| releasing.contains(p));
            releasing
                .iter()
                .filter(|p| *marked.entry(**p).or_insert(now) <= settled)
                .copied()
                .collect()
        } else {
            releasing.iter().copied().collect()
        };
        let mut released = Vec::new();
        if !releasable.is_empty() {
            let ids = releasable;
            released = sqlx::query_scalar(
                "UPDATE outbox_relay_partitions SET owner = NULL, acquired_at = NULL \
                 WHERE partition IN (SELECT partition FROM outbox_relay_partitions \
                                     WHERE owner = $1 AND partition = ANY($2) \
                                     ORDER BY partition FOR UPDATE SKIP LOCKED) \
                 RETURNING partition",
            )
            .persistent(false)
            .bind(&self.relay_id)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            for p in &released {
                owned.remove(p);
                releasing.remove(p);
            }
        }

        // Take free partitions, or those of relays whose lease ran out.
        let want = (share as usize).saturating_sub(owned.len());
        let mut acquired: Vec<i32> = Vec::new();
        if want > 0 && releasing.is_empty() {
            // Exactly-once: a previous owner whose lease ran out joins the
            // partition's unfenced list (a released partition has no owner,
            // and keeps its list). Otherwise the list is emptied.
            acquired = sqlx::query_scalar(
                "UPDATE outbox_relay_partitions rp \
                 SET owner = $1, epoch = rp.epoch + 1, acquired_at = clock_timestamp(), \
                     unfenced = CASE WHEN NOT $3 THEN '{}' \
                                     WHEN c.previous IS NULL OR c.previous = $1 THEN rp.unfenced \
                                     ELSE array_append(array_remove(rp.unfenced, c.previous), c.previous) END \
                 FROM (SELECT partition, owner AS previous FROM outbox_relay_partitions \
                       WHERE owner IS NULL OR owner NOT IN \
                           (SELECT relay_id FROM outbox_relays WHERE lease_until > clock_timestamp()) \
                       ORDER BY partition LIMIT $2 FOR UPDATE SKIP LOCKED) c \
                 WHERE rp.partition = c.partition \
                 RETURNING rp.partition",
            )
            .persistent(false)
            .bind(&self.relay_id)
            .bind(want as i64)
            .bind(self.exactly_once)
            .fetch_all(&mut *tx)
            .await?;
            acquired.sort_unstable();
            owned.extend(acquired.iter().copied());
        }
        let recovering: BTreeMap<i32, Vec<String>> = if self.exactly_once {
            sqlx::query_as::<_, (i32, Vec<String>)>(
                "SELECT partition, unfenced FROM outbox_relay_partitions \
                 WHERE owner = $1 AND cardinality(unfenced) > 0",
            )
            .persistent(false)
            .bind(&self.relay_id)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect()
        } else {
            BTreeMap::new()
        };

        // Forget relays gone for a while that own nothing.
        sqlx::query(
            "DELETE FROM outbox_relays r WHERE r.lease_until < clock_timestamp() - interval '10 minutes' \
             AND NOT EXISTS (SELECT 1 FROM outbox_relay_partitions p WHERE p.owner = r.relay_id)",
        )
        .persistent(false)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;

        if !released.is_empty() {
            info!(partitions = ?released, share, live_relays = live, "released partitions to other relays");
            telemetry::partitions_released(released.len());
        }
        if !acquired.is_empty() {
            info!(partitions = ?acquired, share, live_relays = live, "took over partitions");
            telemetry::partitions_acquired(acquired.len());
        }
        debug!(
            owned = owned.len(),
            share,
            live_relays = live,
            "lease renewed"
        );
        telemetry::ownership(owned.len(), live);
        let mut st = self.state.lock().expect("ownership lock");
        *st = Ownership {
            partitions: n,
            owned,
            releasing,
            recovering,
            live_relays: live,
            last_error: None,
        };
        Ok(acquired.len())
    }

    /// Releases every partition and removes this relay's registration, so
    /// other relays take its partitions over at their next heartbeat. Waits
    /// at most 5 s for this relay's own claims to end.
    pub async fn release_all(&self) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT set_config('lock_timeout', '5s', true)")
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        let released = sqlx::query(
            "UPDATE outbox_relay_partitions SET owner = NULL, acquired_at = NULL WHERE owner = $1",
        )
        .persistent(false)
        .bind(&self.relay_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM outbox_relays WHERE relay_id = $1")
            .persistent(false)
            .bind(&self.relay_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        *self.state.lock().expect("ownership lock") = Ownership::default();
        telemetry::ownership(0, 0);
        Ok(released as usize)
    }
}
