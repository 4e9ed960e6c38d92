//! Waking the relay: `LISTEN` for the outbox trigger's notifications, and the
//! waiting flag that tells producers when to send them.
//!
//! Every notifying commit takes PostgreSQL's cluster-wide notification lock
//! and holds it through its WAL flush, so under load notifying commits run
//! one at a time. A busy relay does not need them: after each batch it claims
//! again at once, until a claim comes back empty. So the trigger (migration
//! V4) notifies only while some live relay has set `waiting_since` in its
//! `outbox_relays` row, and a relay sets it only just before it sleeps:
//!
//! 0. a claim came back empty less than [`LINGER`] after one found rows:
//!    nap [`LINGER_NAP`] and claim again, flag down. Under a steady load the
//!    flag then never goes up, so producers never notify, and the relay
//!    does not commit a raise and a lower around every batch;
//! 1. a claim came back empty, and none found rows for [`LINGER`]: raise the
//!    flag ([`WaitFlag::raise`]);
//! 2. claim once more, so a row committed before producers could see the
//!    flag is not left waiting;
//! 3. sleep until a notification, the poll timer, or shutdown. The first
//!    sleep after raising the flag is short ([`RECHECK_AFTER`]), then the
//!    relay claims once more;
//! 4. once a claim finds rows again, lower the flag ([`WaitFlag::lower`]).
//!
//! The trigger reads the flag when the inserting statement runs (it is a
//! statement-level trigger, the cheapest kind: `BENCHMARKS.md`). A producer
//! transaction that inserted before the flag went up and commits after step
//! 2 sends no notification. Step 3's short sleep picks up such a row if it
//! committed within [`RECHECK_AFTER`]; a transaction that runs on longer
//! after its insert waits for the poll timer
//! ([`crate::RelayConfig::poll_interval`]) at worst. Appending the event
//! last, just before `COMMIT`, keeps that window small. The relay raises the
//! flag only while its `LISTEN` connection works, so producers never notify
//! a relay that cannot hear them.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sqlx::{postgres::PgListener, PgExecutor, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use outbox_core::backoff::Backoff;

use crate::{health::Health, retry::back_off, store, telemetry};

/// How long the first sleep after raising the flag lasts at most, before the
/// relay claims once more (step 3 above).
pub const RECHECK_AFTER: Duration = Duration::from_millis(25);

/// How long after its last claim that found rows a relay keeps claiming
/// with its flag down before it raises the flag (step 0 above). At 1,000
/// events/s a claim every [`LINGER_NAP`] finds rows long before this runs
/// out; without it, the flag went up and down around every batch and the
/// producers' notifying commits queued on PostgreSQL's notification lock
/// (`BENCHMARKS.md`, set V).
pub const LINGER: Duration = Duration::from_millis(20);

/// The nap between two claims while lingering (step 0 above).
pub const LINGER_NAP: Duration = Duration::from_millis(2);

/// The wake protocol as the publish loop runs it: after each batch, claim
/// again at once or raise the flag and sleep (steps 1 to 4 above).
#[derive(Debug)]
pub(crate) struct Wakeups {
    flag: WaitFlag,
    wake: Arc<Notify>,
    listening: Arc<AtomicBool>,
    poll_interval: Duration,
    /// The next sleep is the short one right after raising the flag.
    recheck: bool,
    /// When a claim last found rows (step 0 above).
    found_at: Option<Instant>,
}

impl Wakeups {
    /// `wake` is notified by [`listen`], which sets `listening` while its
    /// connection works.
    pub(crate) fn new(
        flag: WaitFlag,
        wake: Arc<Notify>,
        listening: Arc<AtomicBool>,
        poll_interval: Duration,
    ) -> Self {
        Self {
            flag,
            wake,
            listening,
            poll_interval,
            recheck: false,
            found_at: None,
        }
    }

    /// The relay owns nothing to claim from: flag down, and sleep for the
    /// poll interval or until woken (a take-over wakes it too).
    pub(crate) async fn idle(&mut self, shutdown: &CancellationToken) {
        self.flag.lower().await;
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(self.poll_interval) => {}
            _ = shutdown.cancelled() => {}
        }
    }

    /// After a batch that went through: returns at once when the relay
    /// should claim again (`claimed` rows were found, or `more` are known to
    /// wait: the batch was full or the next one is prefetched), else sleeps
    /// until a notification, the timer, or shutdown.
    pub(crate) async fn after_batch(
        &mut self,
        claimed: usize,
        more: bool,
        shutdown: &CancellationToken,
    ) {
        if claimed > 0 {
            // Busy: producers need not notify (step 4).
            self.flag.lower().await;
            self.found_at = Some(Instant::now());
        }
        if more {
            return;
        }
        let mut lingering = false;
        if self.listening.load(Ordering::SeqCst) {
            if claimed > 0 {
                // Claim again at once, until a claim finds nothing.
                return;
            }
            if !self.flag.is_raised() {
                // Rows came less than LINGER ago: nap briefly and claim
                // again, flag down (step 0); else raise the flag.
                lingering = self.found_at.is_some_and(|at| at.elapsed() < LINGER);
                if !lingering && self.flag.raise().await {
                    // Claim once more, now that producers notify (steps 1, 2).
                    self.recheck = true;
                    return;
                }
            }
        } else {
            // Producers must not notify a relay that cannot hear them.
            self.flag.lower().await;
        }
        let nap = if lingering {
            LINGER_NAP
        } else if std::mem::take(&mut self.recheck) {
            RECHECK_AFTER
        } else {
            self.poll_interval
        };
        tokio::select! {
            _ = self.wake.notified() => telemetry::wakeup(if lingering { "linger" } else { "notify" }),
            _ = tokio::time::sleep(nap.min(self.poll_interval)) => {
                telemetry::wakeup(if lingering { "linger" } else { "timer" });
            }
            _ = shutdown.cancelled() => {}
        }
    }
}

/// This relay's waiting flag (`outbox_relays.waiting_since`).
#[derive(Debug)]
pub struct WaitFlag {
    pool: PgPool,
    relay_id: String,
    raised: bool,
    warned: bool,
}

impl WaitFlag {
    /// The flag of `relay_id`, lowered.
    pub fn new(pool: PgPool, relay_id: String) -> Self {
        Self {
            pool,
            relay_id,
            raised: false,
            warned: false,
        }
    }

    /// Whether the flag is up (as far as this relay knows).
    pub fn is_raised(&self) -> bool {
        self.raised
    }

    /// Raises the flag: from its commit on, producers notify. Returns false
    /// if it could not (the relay is not registered yet, or the database
    /// fails or lacks migration V4); the relay then sleeps as before V4, and
    /// a V3 trigger still notifies on every commit.
    pub async fn raise(&mut self) -> bool {
        self.raised = self.set(true).await == Some(true);
        self.raised
    }

    /// Lowers the flag, if it is up: producers stop notifying this relay.
    pub async fn lower(&mut self) {
        if self.raised {
            // On a database error the flag stays up (producers keep
            // notifying, which costs them but loses nothing) and the next
            // batch tries again. A missing row has no flag to lower.
            self.raised = self.set(false).await.is_none();
        }
    }

    /// Sets the flag; `Some(whether the relay's row exists)`, or `None` when
    /// the database failed (warned once).
    async fn set(&mut self, waiting: bool) -> Option<bool> {
        match set_waiting(&self.pool, &self.relay_id, waiting).await {
            Ok(updated) => Some(updated),
            Err(e) => {
                if !self.warned {
                    self.warned = true;
                    warn!(error = %store::explain(&e),
                          "cannot set this relay's waiting flag in outbox_relays; \
                           if the column waiting_since is missing, run `outbox-relay migrate`");
                }
                None
            }
        }
    }
}

/// Wakes the relay on every notification; wakes it too whenever the
/// listening connection was lost (notifications may have been missed).
/// `listening` is true while a listening connection is known to work.
/// A lost connection makes the relay unready at once (`health`): it is
/// usually the first sign of a database gone, seconds before a claim's
/// connection attempt gives up; the next batch that goes through makes it
/// ready again.
///
/// Each new listening connection first sends itself a probe notification.
/// If it never comes back (a connection pooler in transaction mode drops
/// notifications), the relay says so once and keeps polling.
pub async fn listen(
    pool: PgPool,
    channel: String,
    wake: Arc<Notify>,
    listening: Arc<AtomicBool>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    const PROBE_WAIT: Duration = Duration::from_secs(5);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut warned = false;
    while !shutdown.is_cancelled() {
        listening.store(false, Ordering::SeqCst);
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %store::explain(&e), "cannot open the LISTEN connection; polling meanwhile");
                back_off(&mut backoff, &shutdown).await;
                continue;
            }
        };
        // Say a lost connection at once (Ok(None)); this loop opens the
        // next one itself, and probes it.
        listener.eager_reconnect(false);
        if let Err(e) = listener.listen(&channel).await {
            warn!(error = %store::explain(&e), "LISTEN failed; polling meanwhile");
            back_off(&mut backoff, &shutdown).await;
            continue;
        }
        backoff.reset();
        wake.notify_one();
        let probe = format!("outbox-relay-probe:{:016x}", rand::random::<u64>());
        let sent = async {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .persistent(false)
                .bind(&channel)
                .bind(&probe)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        };
        let mut probing = sent.await.is_ok();
        let deadline = tokio::time::sleep(PROBE_WAIT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = listener.try_recv() => match r {
                    Ok(Some(n)) => {
                        if probing && n.payload() == probe {
                            probing = false;
                            listening.store(true, Ordering::SeqCst);
                            debug!("LISTEN works: the probe notification came back");
                        }
                        wake.notify_one();
                    }
                    Ok(None) => {
                        // Notifications sent meanwhile are lost. Reconnect
                        // and probe again before relying on them.
                        debug!("LISTEN connection lost; reconnecting");
                        health.database_lost("the LISTEN connection was lost; reconnecting");
                        wake.notify_one();
                        break;
                    }
                    Err(e) => {
                        warn!(error = %e, "LISTEN connection failed; reconnecting");
                        health.database_lost("the LISTEN connection failed; reconnecting");
                        wake.notify_one();
                        break;
                    }
                },
                _ = &mut deadline, if probing => {
                    probing = false;
                    if !warned {
                        warned = true;
                        warn!(channel = %channel, wait = ?PROBE_WAIT,
                              "LISTEN received no notification of the relay's own probe: \
                               DATABASE_URL may go through a connection pooler in transaction mode, \
                               which drops notifications. The relay polls meanwhile; run it with \
                               --transaction-pooler (and a short --poll-interval), or point it at \
                               PostgreSQL directly");
                    }
                }
                _ = shutdown.cancelled() => break,
            }
        }
    }
    listening.store(false, Ordering::SeqCst);
}

/// Raises (`waiting`) or lowers the waiting flag of `relay_id`, in its own
/// transaction: the outbox trigger notifies only while some live relay's
/// flag is up. Returns whether the relay's row exists.
async fn set_waiting<'e>(
    db: impl PgExecutor<'e>,
    relay_id: &str,
    waiting: bool,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE outbox_relays \
         SET waiting_since = CASE WHEN $2 THEN clock_timestamp() END \
         WHERE relay_id = $1",
    )
    .persistent(false)
    .bind(relay_id)
    .bind(waiting)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
