//! One message's life: decode, the dedupe transaction around the handler,
//! retries with backoff, and the dead-letter topic.
//!
//! ```text
//! decode ──bad──────────────────────────────────────────────▶ dead letter
//!   │ no handler ───────────────────────────────────────────▶ dead letter (or skip)
//!   ▼
//! BEGIN; INSERT processed_events … ON CONFLICT DO NOTHING
//!   │ conflict ─▶ ROLLBACK, count a duplicate ───────────────▶ done
//!   ▼
//! handler(envelope, tx) ─retryable─▶ ROLLBACK, backoff, again (up to max_attempts)
//!   │                    ─permanent / last try ─▶ ROLLBACK ──▶ dead letter
//!   ▼
//! COMMIT ──────────────────────────────────────────────────▶ done
//! ```
//!
//! "Done" lets the caller store the offset. A database that fails (begin,
//! dedupe insert, commit, or a lost connection under the handler's own
//! statements: see [`is_outage`]) is retried for as long as it takes,
//! without using up the handler's tries, probing at least every
//! [`OUTAGE_PROBE_MAX`] so that work resumes within about a second of the
//! database's return; a dead-letter publish that fails is retried with
//! backoff. A message is never acknowledged before it was applied, found
//! duplicate, or dead-lettered.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration, time::Instant};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info_span, warn, Instrument};

use crate::{
    config::{ConsumerConfig, Ordering, UnknownEventType},
    dead_letter::{self, DeadLetterKind},
    dedupe,
    envelope::RawEnvelope,
    handler::{BoxError, HandlerError, Prepared, Route},
    message::Message,
    park,
    telemetry::{self, ConsumerStats, StatField},
};

/// What the partition worker does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Done {
    /// Applied, duplicate, skipped or dead-lettered: store the offset.
    Completed,
    /// Stopped (shutdown or revoke) before the message was settled: do not
    /// store its offset; it is redelivered later.
    Abandoned,
}

/// Everything the workers share.
pub(crate) struct Shared {
    pub(crate) cfg: ConsumerConfig,
    pub(crate) pool: sqlx::PgPool,
    pub(crate) routes: std::collections::HashMap<String, Arc<dyn Route>>,
    /// The sagas among the routes' handlers, by name (their gauges).
    pub(crate) sagas: Vec<&'static str>,
    pub(crate) dead_letters: dead_letter::DeadLetterSink,
    pub(crate) stats: Arc<ConsumerStats>,
    pub(crate) health: Arc<crate::health::Health>,
    pub(crate) permits: tokio::sync::Semaphore,
    /// The RabbitMQ source's delay queues, when retries wait there instead
    /// of in place (unordered consumption).
    #[cfg(feature = "rabbitmq")]
    pub(crate) delay_queues: Option<Arc<crate::rabbitmq::Link>>,
}

enum Applied {
    New,
    Duplicate,
}

enum Failure {
    /// The database itself failed: retry without counting a handler try.
    Infrastructure(BoxError),
    Handler(HandlerError),
}

/// The longest wait between tries while the database is unreachable: each
/// try is a probe, so work resumes within about this long of its return.
pub(crate) const OUTAGE_PROBE_MAX: Duration = Duration::from_secs(1);

/// Whether `err` says the database is unreachable or going away, rather
/// than that this statement failed: lost or refused connections, an empty
/// or closed pool, SQLSTATE class 08 (connection exception) and 57P
/// (operator intervention: admin or crash shutdown, cannot connect now).
/// Such an error inside a handler is an outage, not the handler's failure.
pub(crate) fn is_outage(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

/// The outage in a handler's error, if any: an [`is_outage`] database
/// error anywhere in its source chain.
fn outage_in(err: &HandlerError) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = match err {
        HandlerError::Retryable(e) | HandlerError::Permanent(e) => Some(e.as_ref()),
    };
    while let Some(e) = next {
        if let Some(db) = e.downcast_ref::<sqlx::Error>() {
            if is_outage(db) {
                return Some(db.to_string());
            }
        }
        next = e.source();
    }
    None
}

/// Settles `msg`. Only sleeps are cut short by `stop`; a transaction in
/// progress always runs to its end.
///
/// `prior` is the handler's failure of a first try that already happened (in
/// a batch that was rolled back): it counts as try 1.
async fn process(
    shared: &Shared,
    msg: &Message,
    stop: &CancellationToken,
    prior: Option<HandlerError>,
) -> Done {
    let settled = match park::key_of(msg, &shared.cfg.ordering_key) {
        Some(key) if shared.cfg.ordering == Ordering::ParkKey => {
            in_key_order(shared, msg, &key, stop, prior).await
        }
        _ => decode_and_settle(shared, msg, stop, prior).await,
    };
    match settled {
        Settled::Abandoned => Done::Abandoned,
        Settled::Done | Settled::DeadLettered(_) | Settled::Deferred(_) => {
            shared.health.progressed();
            Done::Completed
        }
    }
}

/// Settles `msgs`, ready messages of one partition in offset order, and
/// returns how far it got: every message before the returned index is
/// settled (its offset may be stored), and if the index is short of
/// `msgs.len()` the worker stops (abandoned).
///
/// The fast path applies them all in **one** transaction: for each, the
/// dedupe insert and then its handler, and one `COMMIT` for all (one WAL
/// flush instead of one per message). It is taken only when every message
/// decodes, has a handler, and no key of the batch is parked. If any handler
/// fails, or the database does, the transaction is rolled back whole and
/// each message is settled on its own as [`process`] does, so a failure
/// affects only its own message (the others are applied in the per-message
/// path; nothing was committed by the batch).
pub(crate) async fn process_batch(
    shared: &Shared,
    msgs: &[Message],
    stop: &CancellationToken,
) -> usize {
    let mut failed = None;
    if msgs.len() > 1 {
        match apply_batch(shared, msgs).await {
            BatchEnd::All => {
                shared.health.progressed();
                shared.health.database_up();
                return msgs.len();
            }
            BatchEnd::NotTaken => {}
            BatchEnd::Failed { at, error } => failed = Some((at, error)),
        }
    }
    for (i, msg) in msgs.iter().enumerate() {
        let prior = match &mut failed {
            Some((at, _)) if *at == i => failed.take().map(|(_, e)| e),
            _ => None,
        };
        if process(shared, msg, stop, prior).await == Done::Abandoned {
            return i;
        }
    }
    msgs.len()
}

/// How the batch fast path ended.
enum BatchEnd {
    /// Every message applied (or found a duplicate), committed together.
    All,
    /// Not taken (a message that needs its own path, a parked key) or the
    /// database failed: nothing committed.
    NotTaken,
    /// The handler of message `at` failed (its first try); nothing
    /// committed.
    Failed { at: usize, error: HandlerError },
}

/// The batch fast path; see [`BatchEnd`].
async fn apply_batch(shared: &Shared, msgs: &[Message]) -> BatchEnd {
    match try_batch(shared, msgs).await {
        Ok(()) => BatchEnd::All,
        Err(end) => end,
    }
}

async fn try_batch(shared: &Shared, msgs: &[Message]) -> Result<(), BatchEnd> {
    let not_taken = |_| BatchEnd::NotTaken;
    let cfg = &shared.cfg;
    let mut prepared = Vec::with_capacity(msgs.len());
    for msg in msgs {
        let raw = RawEnvelope::decode_message(msg).map_err(|_| BatchEnd::NotTaken)?;
        let route = shared
            .routes
            .get(&raw.event_type)
            .ok_or(BatchEnd::NotTaken)?;
        let handler = route.prepare(&raw).map_err(|_| BatchEnd::NotTaken)?;
        prepared.push((raw, handler));
    }
    if cfg.ordering == Ordering::ParkKey {
        let keys: Vec<String> = msgs
            .iter()
            .filter_map(|m| park::key_of(m, &cfg.ordering_key))
            .collect();
        let topic = msgs[0].topic();
        match park::any_blocked(&shared.pool, &cfg.group_id, topic, &keys).await {
            Ok(false) => {}
            _ => return Err(BatchEnd::NotTaken),
        }
    }
    let started = Instant::now();
    let mut tx = shared.pool.begin().await.map_err(not_taken)?;
    let mut new = Vec::with_capacity(msgs.len());
    for (at, (raw, handler)) in prepared.iter().enumerate() {
        let is_new = dedupe::record(&mut tx, &cfg.group_id, raw.event_id, &raw.position)
            .await
            .map_err(not_taken)?;
        if is_new {
            // A failure rolls the transaction back when `tx` drops; each
            // message then goes its own way, the failed one with this try
            // counted. A lost database is an outage, not a try.
            match AssertUnwindSafe(handler.apply(&mut tx))
                .catch_unwind()
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(error)) if outage_in(&error).is_some() => return Err(BatchEnd::NotTaken),
                Ok(Err(error)) => return Err(BatchEnd::Failed { at, error }),
                Err(panic) => {
                    return Err(BatchEnd::Failed {
                        at,
                        error: HandlerError::permanent(format!(
                            "handler panicked: {}",
                            panic_text(panic.as_ref())
                        )),
                    })
                }
            }
        }
        new.push(is_new);
    }
    tx.commit().await.map_err(not_taken)?;
    let took = started.elapsed() / msgs.len() as u32;
    for ((raw, _), is_new) in prepared.iter().zip(new) {
        if is_new {
            shared.stats.add(StatField::Processed);
            telemetry::processed(&cfg.group_id, &raw.position.topic, &raw.event_type, took);
        } else {
            shared.stats.add(StatField::Duplicate);
            telemetry::duplicate(&cfg.group_id, &raw.position.topic);
        }
    }
    debug!(messages = msgs.len(), "applied as one batch");
    Ok(())
}

/// How one message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Settled {
    /// Applied, a duplicate, skipped, or parked.
    Done,
    /// Sent to the dead-letter topic, for this reason.
    DeadLettered(String),
    /// Its retry waits in the outbox (`defer.rs`), for this reason: under
    /// park-key its key is blocked behind it, as behind a dead letter.
    Deferred(String),
    /// Stopped before it settled: not acknowledged, redelivered later.
    Abandoned,
}

/// Settles `msg` of ordering key `key` under [`Ordering::ParkKey`]: see
/// `park.rs`. Database outages on the parking tables wait like any other,
/// without spending a handler try.
async fn in_key_order(
    shared: &Shared,
    msg: &Message,
    key: &str,
    stop: &CancellationToken,
    prior: Option<HandlerError>,
) -> Settled {
    let (group, topic) = (shared.cfg.group_id.as_str(), msg.topic());
    let event_id = RawEnvelope::decode_message(msg).ok().map(|r| r.event_id);
    let Some(block) = until_db(shared, stop, || {
        park::block_of(&shared.pool, group, topic, key)
    })
    .await
    else {
        return Settled::Abandoned;
    };
    match block {
        None => {
            let settled = decode_and_settle(shared, msg, stop, prior).await;
            if let Settled::DeadLettered(reason) | Settled::Deferred(reason) = &settled {
                if !block_key(shared, msg, key, event_id, reason, stop).await {
                    return Settled::Abandoned;
                }
            }
            settled
        }
        Some(b) if b.blocking_event_id.is_some() && b.blocking_event_id == event_id => {
            // The blocking event, replayed: apply it, then what waited.
            let settled = decode_and_settle(shared, msg, stop, prior).await;
            match &settled {
                Settled::Done => drain(shared, topic, key, stop).await,
                Settled::DeadLettered(reason) | Settled::Deferred(reason) => {
                    if block_key(shared, msg, key, event_id, reason, stop).await {
                        settled
                    } else {
                        Settled::Abandoned
                    }
                }
                Settled::Abandoned => settled,
            }
        }
        Some(b) => {
            if b.blocking_event_id.is_none() {
                // An operator discarded the block: apply what waited first.
                if drain(shared, topic, key, stop).await == Settled::Abandoned {
                    return Settled::Abandoned;
                }
            }
            let Some(parked) = until_db(shared, stop, || {
                park::park(&shared.pool, group, key, msg, event_id)
            })
            .await
            else {
                return Settled::Abandoned;
            };
            if parked {
                debug!(key, "parked behind the key's dead-lettered event");
                shared.stats.add(StatField::Parked);
                telemetry::parked(group, topic);
                Settled::Done
            } else {
                // Unblocked meanwhile.
                decode_and_settle(shared, msg, stop, prior).await
            }
        }
    }
}

/// Applies the events parked behind `key`, in order, through the usual
/// dedupe transaction, then unblocks the key. A parked event that is
/// dead-lettered blocks the key in turn, and the rest stay parked.
async fn drain(shared: &Shared, topic: &str, key: &str, stop: &CancellationToken) -> Settled {
    let group = shared.cfg.group_id.as_str();
    loop {
        let Some(next) = until_db(shared, stop, || {
            park::next_parked(&shared.pool, group, topic, key)
        })
        .await
        else {
            return Settled::Abandoned;
        };
        let Some((seq, parked)) = next else {
            match until_db(shared, stop, || {
                park::unblock_if_empty(&shared.pool, group, topic, key)
            })
            .await
            {
                None => return Settled::Abandoned,
                Some(true) => {
                    debug!(key, "every parked event applied; key unblocked");
                    return Settled::Done;
                }
                Some(false) => continue,
            }
        };
        let settled = decode_and_settle(shared, &parked, stop, None).await;
        if settled == Settled::Abandoned {
            return settled;
        }
        if let Settled::DeadLettered(reason) | Settled::Deferred(reason) = &settled {
            let event_id = RawEnvelope::decode_message(&parked)
                .ok()
                .map(|r| r.event_id);
            if !block_key(shared, &parked, key, event_id, reason, stop).await {
                return Settled::Abandoned;
            }
        }
        if until_db(shared, stop, || park::remove(&shared.pool, seq))
            .await
            .is_none()
        {
            return Settled::Abandoned;
        }
        if matches!(settled, Settled::DeadLettered(_) | Settled::Deferred(_)) {
            return Settled::Done;
        }
    }
}

/// Drains the keys of `topic`'s `partition` whose block an operator
/// discarded. Run by the partition's worker every
/// [`park::PARK_CHECK_EVERY`].
pub(crate) async fn drain_discarded(
    shared: &Shared,
    topic: &str,
    partition: i32,
    stop: &CancellationToken,
) -> Done {
    let group = shared.cfg.group_id.as_str();
    let keys = match park::discarded(&shared.pool, group, topic, partition).await {
        Ok(keys) => keys,
        Err(e) => {
            debug!(error = %e, "could not look for discarded blocks; trying again later");
            return Done::Completed;
        }
    };
    for key in keys {
        debug!(%key, "block discarded by an operator; applying the parked events");
        if drain(shared, topic, &key, stop).await == Settled::Abandoned {
            return Done::Abandoned;
        }
    }
    Done::Completed
}

/// Blocks `key` behind `msg`, just dead-lettered. `false` when stopped
/// during a database outage.
async fn block_key(
    shared: &Shared,
    msg: &Message,
    key: &str,
    event_id: Option<uuid::Uuid>,
    reason: &str,
    stop: &CancellationToken,
) -> bool {
    let position = msg.position.to_string();
    until_db(shared, stop, || {
        park::block(
            &shared.pool,
            &shared.cfg.group_id,
            msg.topic(),
            key,
            msg.partition(),
            event_id,
            &position,
            reason,
        )
    })
    .await
    .is_some()
}

/// Runs `op` until the database answers it, waiting as during any outage
/// (never spending a handler try). `None` when stopped first.
async fn until_db<T, F, Fut>(shared: &Shared, stop: &CancellationToken, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut outages = 0;
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                outages += 1;
                warn!(error = %e, "database unreachable (parked keys); waiting for it");
                shared.health.database_down(&e.to_string());
                telemetry::infra_error(&shared.cfg.group_id, "database");
                if !sleep_or_stop(outage_backoff(outages, &shared.cfg), stop).await {
                    return None;
                }
            }
        }
    }
}

async fn decode_and_settle(
    shared: &Shared,
    msg: &Message,
    stop: &CancellationToken,
    prior: Option<HandlerError>,
) -> Settled {
    let raw = match RawEnvelope::decode_message(msg) {
        Ok(raw) => raw,
        Err(e) => {
            let span = info_span!("consume", position = %msg.position.to_string());
            return dead_letter(
                shared,
                msg,
                DeadLetterKind::Undecodable,
                &e.to_string(),
                0,
                stop,
            )
            .instrument(span)
            .await;
        }
    };
    let span = info_span!(
        "consume",
        event_id = %raw.event_id,
        correlation_id = raw.correlation_id.as_deref(),
        event_type = %raw.event_type,
        position = %raw.position,
        traceparent = raw.traceparent.as_deref().unwrap_or(""),
    );
    settle(shared, msg, &raw, stop, prior)
        .instrument(span)
        .await
}

async fn settle(
    shared: &Shared,
    msg: &Message,
    raw: &RawEnvelope,
    stop: &CancellationToken,
    prior: Option<HandlerError>,
) -> Settled {
    let cfg = &shared.cfg;
    let Some(route) = shared.routes.get(&raw.event_type) else {
        return match cfg.unknown_event_type {
            UnknownEventType::Skip => {
                debug!("no handler for this event type; skipped");
                shared.stats.add(StatField::Skipped);
                telemetry::skipped(&cfg.group_id, msg.topic());
                Settled::Done
            }
            UnknownEventType::DeadLetter => {
                let reason = format!(
                    "no handler for event type {:?} in consumer group {:?}",
                    raw.event_type, cfg.group_id
                );
                dead_letter(
                    shared,
                    msg,
                    DeadLetterKind::UnknownEventType,
                    &reason,
                    0,
                    stop,
                )
                .await
            }
        };
    };
    let prepared = match route.prepare(raw) {
        Ok(p) => p,
        Err(e) => {
            return dead_letter(
                shared,
                msg,
                DeadLetterKind::Undecodable,
                &e.to_string(),
                0,
                stop,
            )
            .await
        }
    };
    // Tries an earlier delivery spent (a RabbitMQ retry) count.
    let mut attempt = msg.prior_attempts;
    let mut outages = 0;
    let mut prior = prior.map(Failure::Handler);
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = match prior.take() {
            Some(failed) => Err(failed),
            None => apply_once(shared, raw, prepared.as_ref()).await,
        };
        match result {
            Ok(Applied::New) => {
                shared.health.database_up();
                debug!(attempt, "applied");
                shared.stats.add(StatField::Processed);
                telemetry::processed(
                    &cfg.group_id,
                    msg.topic(),
                    &raw.event_type,
                    started.elapsed(),
                );
                return Settled::Done;
            }
            Ok(Applied::Duplicate) => {
                shared.health.database_up();
                debug!("already applied by this group; skipped as a duplicate");
                shared.stats.add(StatField::Duplicate);
                telemetry::duplicate(&cfg.group_id, msg.topic());
                return Settled::Done;
            }
            Err(Failure::Infrastructure(e)) => {
                attempt -= 1;
                outages += 1;
                warn!(error = %e, "database unreachable; the message waits for it without spending a handler try");
                shared.health.database_down(&e.to_string());
                telemetry::infra_error(&cfg.group_id, "database");
                if !sleep_or_stop(outage_backoff(outages, cfg), stop).await {
                    return Settled::Abandoned;
                }
            }
            Err(Failure::Handler(HandlerError::Retryable(e))) if attempt < cfg.max_attempts => {
                warn!(attempt, max_attempts = cfg.max_attempts, error = %e, "handler failed; retrying with backoff");
                shared.stats.add(StatField::Retry);
                telemetry::retry(&cfg.group_id, msg.topic());
                #[cfg(feature = "rabbitmq")]
                if let Some(queues) = &shared.delay_queues {
                    // The copy comes back after the delay; this delivery is
                    // done. Should the copy not be confirmed, retry here.
                    match queues
                        .retry_later(msg, attempt, backoff(attempt, cfg))
                        .await
                    {
                        Ok(()) => return Settled::Done,
                        Err(why) => {
                            warn!(error = %why, "cannot send the retry to its delay queue; retrying in place")
                        }
                    }
                }
                let delay = backoff(attempt, cfg);
                if let Some(deferred) = try_defer(shared, msg, raw, attempt, delay, &e).await {
                    return deferred;
                }
                if !sleep_or_stop(delay, stop).await {
                    return Settled::Abandoned;
                }
            }
            Err(Failure::Handler(HandlerError::Retryable(e))) => {
                let reason = format!("still failing after {attempt} tries: {e}");
                return dead_letter(
                    shared,
                    msg,
                    DeadLetterKind::RetriesExhausted,
                    &reason,
                    attempt,
                    stop,
                )
                .await;
            }
            Err(Failure::Handler(HandlerError::Permanent(e))) => {
                let reason = format!("permanent error: {e}");
                return dead_letter(
                    shared,
                    msg,
                    DeadLetterKind::Permanent,
                    &reason,
                    attempt,
                    stop,
                )
                .await;
            }
        }
    }
}

/// The dedupe transaction: one attempt.
async fn apply_once(
    shared: &Shared,
    raw: &RawEnvelope,
    prepared: &dyn Prepared,
) -> Result<Applied, Failure> {
    let infra = |e: sqlx::Error| Failure::Infrastructure(e.into());
    let mut tx = shared.pool.begin().await.map_err(infra)?;
    let new = dedupe::record(&mut tx, &shared.cfg.group_id, raw.event_id, &raw.position)
        .await
        .map_err(infra)?;
    if !new {
        // Nothing was written; ending the transaction is all that is left.
        let _ = tx.rollback().await;
        return Ok(Applied::Duplicate);
    }
    match AssertUnwindSafe(prepared.apply(&mut tx))
        .catch_unwind()
        .await
    {
        Ok(Ok(())) => {
            tx.commit().await.map_err(infra)?;
            Ok(Applied::New)
        }
        Ok(Err(e)) => {
            let _ = tx.rollback().await;
            match outage_in(&e) {
                Some(outage) => Err(Failure::Infrastructure(
                    format!("the handler's statement lost the database: {outage}").into(),
                )),
                None => Err(Failure::Handler(e)),
            }
        }
        Err(panic) => {
            // The transaction is dropped, which rolls it back.
            Err(Failure::Handler(HandlerError::permanent(format!(
                "handler panicked: {}",
                panic_text(panic.as_ref())
            ))))
        }
    }
}

/// Defers the retry of `msg` to the outbox when its `delay` reaches
/// [`ConsumerConfig::defer_retries_after`] (Kafka only; see `defer.rs`).
/// `None`: the retry waits in place.
async fn try_defer(
    shared: &Shared,
    msg: &Message,
    raw: &RawEnvelope,
    attempt: u32,
    delay: Duration,
    error: &BoxError,
) -> Option<Settled> {
    let after = shared.cfg.defer_retries_after?;
    if delay < after || !matches!(shared.dead_letters, dead_letter::DeadLetterSink::Kafka(_)) {
        return None;
    }
    match crate::defer::defer(shared, msg, raw, attempt, delay).await {
        Ok(due) => {
            debug!(attempt, %due, "retry deferred to the outbox");
            telemetry::deferred(&shared.cfg.group_id, msg.topic());
            Some(Settled::Deferred(format!(
                "retry {} deferred to the outbox until {} after: {error}",
                attempt + 1,
                due.format("%Y-%m-%dT%H:%M:%S%.3fZ")
            )))
        }
        Err(why) => {
            warn!(error = %why, "cannot defer the retry to the outbox; it waits in place");
            None
        }
    }
}

/// Publishes `msg` to its dead-letter topic, retrying with backoff until
/// Kafka acknowledges it (or the worker is stopped: then the message is not
/// acknowledged, and is redelivered).
async fn dead_letter(
    shared: &Shared,
    msg: &Message,
    kind: DeadLetterKind,
    reason: &str,
    attempts: u32,
    stop: &CancellationToken,
) -> Settled {
    let cfg = &shared.cfg;
    let destination = shared.dead_letters.destination(cfg, msg);
    error!(kind = kind.as_str(), reason, dead_letter = %destination, "dead-lettering message");
    let mut failures = 0;
    loop {
        match shared
            .dead_letters
            .send(cfg, msg, kind, reason, attempts)
            .await
        {
            Ok(()) => {
                shared.stats.add(StatField::DeadLettered);
                telemetry::dead_lettered(&cfg.group_id, msg.topic(), kind.as_str());
                return Settled::DeadLettered(reason.to_string());
            }
            Err(e) => {
                failures += 1;
                telemetry::infra_error(&cfg.group_id, "dead_letter");
                error!(error = %e, "dead-letter publish failed; the message is held (its partition waits) and retried");
                if !sleep_or_stop(backoff(failures, cfg), stop).await {
                    return Settled::Abandoned;
                }
            }
        }
    }
}

/// What a caught panic said.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".into())
}

/// The `n`-th retry delay, see [`outbox_core::backoff`].
pub(crate) fn backoff(n: u32, cfg: &ConsumerConfig) -> Duration {
    outbox_core::backoff::nth(n, cfg.min_backoff, cfg.max_backoff)
}

/// The wait before the `n`-th try during a database outage: the usual
/// backoff, but never longer than [`OUTAGE_PROBE_MAX`].
fn outage_backoff(n: u32, cfg: &ConsumerConfig) -> Duration {
    outbox_core::backoff::nth(n, cfg.min_backoff, cfg.max_backoff.min(OUTAGE_PROBE_MAX))
}

/// Sleeps `d`; false when `stop` fired first.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db_error(code: &str) -> sqlx::Error {
        // The smallest DatabaseError: sqlx builds PgDatabaseError only from
        // the wire, so the tests use their own.
        #[derive(Debug)]
        struct Db(String);
        impl std::fmt::Display for Db {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "SQLSTATE {}", self.0)
            }
        }
        impl std::error::Error for Db {}
        impl sqlx::error::DatabaseError for Db {
            fn message(&self) -> &str {
                "test"
            }
            fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
                Some(self.0.as_str().into())
            }
            fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
                self
            }
            fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
                self
            }
            fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
                self
            }
            fn kind(&self) -> sqlx::error::ErrorKind {
                sqlx::error::ErrorKind::Other
            }
        }
        sqlx::Error::Database(Box::new(Db(code.into())))
    }

    #[test]
    fn lost_connections_are_outages_and_statement_errors_are_not() {
        let io = || sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        for outage in [
            io(),
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            db_error("08006"), // connection failure
            db_error("57P01"), // admin shutdown (pg_terminate_backend)
            db_error("57P03"), // cannot connect now
        ] {
            assert!(is_outage(&outage), "{outage}");
        }
        for statement in [
            db_error("23505"), // unique violation
            db_error("40001"), // serialization failure: the handler's to retry
            db_error("57014"), // query canceled (a statement timeout)
            sqlx::Error::RowNotFound,
        ] {
            assert!(!is_outage(&statement), "{statement}");
        }
        // Through a handler's error, as `?` makes it or wrapped in its own.
        assert!(outage_in(&HandlerError::from(io())).is_some());
        #[derive(Debug, thiserror::Error)]
        #[error("saving the order")]
        struct Saving(#[source] sqlx::Error);
        assert!(outage_in(&HandlerError::retryable(Saving(io()))).is_some());
        assert!(outage_in(&HandlerError::from(db_error("23505"))).is_none());
        assert!(outage_in(&HandlerError::retryable("remote service down")).is_none());
    }

    #[test]
    fn outages_are_probed_at_least_every_second() {
        let cfg = ConsumerConfig::new("g", ["t"]);
        assert!(
            cfg.max_backoff > OUTAGE_PROBE_MAX,
            "the default cap is longer"
        );
        for n in 1..40 {
            assert!(outage_backoff(n, &cfg) <= OUTAGE_PROBE_MAX);
        }
        assert!(
            backoff(30, &cfg) > OUTAGE_PROBE_MAX,
            "handler retries keep theirs"
        );
    }
}
