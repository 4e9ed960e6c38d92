//! [`SlotLease`]: which relay may read a replication slot (the WAL
//! source's fencing; poll mode's is in `lease.rs`).
//!
//! PostgreSQL lets one connection read a slot at a time, so two relays
//! never read at once. That alone does not bound a take-over: a reader
//! whose process froze, or whose host fell off the network, keeps its
//! connection and the slot until `wal_sender_timeout` (60 s by default),
//! and nobody else can read meanwhile. The lease bounds it:
//!
//! ```text
//!  relay ──acquire (row in outbox_slot_readers, ours or expired)──► reader
//!    │          │ refused: another relay's lease is live ──► standby, try each second
//!    ▼
//!  replication connection ── slot held by a connection? ── it belongs to a relay
//!    │                                                      whose lease lapsed:
//!    │                                                      pg_terminate_backend, connect
//!    ▼
//!  read, renewing every heartbeat ── renewal failed for the TTL ──► stop confirming,
//!                                                                   drop the connection
//! ```
//!
//! - A relay reads only while it holds the slot's row in
//!   `outbox_slot_readers` (migration V8) with `lease_until` in the future.
//!   Acquiring and renewing are one statement that succeeds only if the row
//!   is absent, ours, or expired.
//! - The reader renews every [`crate::RelayConfig::heartbeat_interval`].
//!   It counts its lease from the moment it *sent* the last successful
//!   renewal, so its own deadline comes before the database's, and it
//!   confirms nothing once that deadline passed: a stale reader cannot
//!   advance the slot.
//! - A relay that acquired the lease and finds the slot still held by a
//!   connection named `outbox-relay` ends that connection: its relay's
//!   lease ran out. It never ends a connection of another program.
//! - A relay that stops cleanly deletes its row, so a standby takes over
//!   within a second instead of a TTL.
//!
//! So a reader that vanished is replaced within the lease TTL plus a
//! second; one that died is replaced within a second (its connection
//! closes with it).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::retry::sleep_or_cancel;

/// The application name of the relay's replication connections: the mark
/// by which a relay holding the lease recognises a stale reader.
pub(crate) const APPLICATION_NAME: &str = "outbox-relay";

/// One relay's claim on one slot.
#[derive(Debug)]
pub(crate) struct SlotLease {
    pool: PgPool,
    slot: String,
    relay_id: String,
    ttl: Duration,
    heartbeat: Duration,
    /// When the last successful acquire or renewal was sent.
    renewed: Mutex<Option<Instant>>,
}

/// What [`SlotLease::acquire`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Acquired {
    /// The lease is ours until the TTL runs out.
    Ours,
    /// Another relay holds a live lease.
    HeldBy(String),
}

impl SlotLease {
    pub(crate) fn new(
        pool: PgPool,
        slot: &str,
        relay_id: &str,
        ttl: Duration,
        heartbeat: Duration,
    ) -> Self {
        Self {
            pool,
            slot: slot.to_string(),
            relay_id: relay_id.to_string(),
            ttl,
            heartbeat,
            renewed: Mutex::new(None),
        }
    }

    /// Takes the lease, or renews it: succeeds if nobody holds it, we do,
    /// or the holder's lease ran out.
    pub(crate) async fn acquire(&self) -> Result<Acquired, sqlx::Error> {
        let sent = Instant::now();
        let holder: String = sqlx::query_scalar(
            "WITH taken AS ( \
               INSERT INTO outbox_slot_readers AS r (slot, relay_id, lease_until, renewed_at) \
               VALUES ($1, $2, clock_timestamp() + $3 * interval '1 millisecond', clock_timestamp()) \
               ON CONFLICT (slot) DO UPDATE \
                 SET relay_id = EXCLUDED.relay_id, lease_until = EXCLUDED.lease_until, \
                     renewed_at = EXCLUDED.renewed_at \
                 WHERE r.relay_id = EXCLUDED.relay_id OR r.lease_until < clock_timestamp() \
               RETURNING relay_id) \
             SELECT relay_id FROM taken \
             UNION ALL \
             SELECT relay_id FROM outbox_slot_readers \
             WHERE slot = $1 AND NOT EXISTS (SELECT FROM taken) \
             LIMIT 1",
        )
        .bind(&self.slot)
        .bind(&self.relay_id)
        .bind(self.ttl.as_millis() as f64)
        .fetch_one(&self.pool)
        .await?;
        let mut renewed = self.renewed.lock().expect("lease lock");
        if holder == self.relay_id {
            *renewed = Some(sent);
            Ok(Acquired::Ours)
        } else {
            *renewed = None;
            Ok(Acquired::HeldBy(holder))
        }
    }

    /// Whether the lease is still ours by this process's clock (counted
    /// from the last successful renewal's sending).
    pub(crate) fn live(&self) -> bool {
        self.renewed
            .lock()
            .expect("lease lock")
            .is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Renews the lease every heartbeat until `stop`; a refused renewal
    /// (another relay took it over) ends the lease at once.
    pub(crate) async fn keep(&self, stop: &CancellationToken) {
        loop {
            if sleep_or_cancel(self.heartbeat, stop).await {
                return;
            }
            match self.acquire().await {
                Ok(Acquired::Ours) => {}
                Ok(Acquired::HeldBy(other)) => {
                    warn!(slot = %self.slot, holder = %other,
                          "another relay took the slot's lease over (ours ran out); letting go");
                    return;
                }
                Err(e) => {
                    if self.live() {
                        warn!(error = %e, "cannot renew the slot's lease; retrying");
                    } else {
                        warn!(error = %e, "cannot renew the slot's lease, and it ran out: \
                                           letting go so that a standby can take over");
                        return;
                    }
                }
            }
        }
    }

    /// Ends the replication connection holding the slot (`pid`) if it is a
    /// relay's: called with the lease held, so that relay's lease ran out.
    /// Returns whether it ended one.
    pub(crate) async fn end_stale_reader(&self, pid: i32) -> Result<bool, sqlx::Error> {
        let ended: Option<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid = $1 AND application_name = $2",
        )
        .bind(pid)
        .bind(APPLICATION_NAME)
        .fetch_optional(&self.pool)
        .await?;
        if ended == Some(true) {
            info!(slot = %self.slot, pid,
                  "ended the replication connection of a relay whose lease ran out; taking the slot over");
        }
        Ok(ended == Some(true))
    }

    /// Gives the lease up (a clean stop), so that a standby need not wait
    /// for the TTL.
    pub(crate) async fn release(&self) {
        *self.renewed.lock().expect("lease lock") = None;
        let _ = sqlx::query("DELETE FROM outbox_slot_readers WHERE slot = $1 AND relay_id = $2")
            .bind(&self.slot)
            .bind(&self.relay_id)
            .execute(&self.pool)
            .await;
    }
}
