//! Orchestrated sagas: a state machine per instance, stored in the
//! consumer's database, that reacts to events and sends commands through the
//! outbox, with a timeout on any step.
//!
//! ```text
//!  event (or a timeout firing) ─► the dedupe transaction (process.rs)
//!     │   a duplicate stops here: it was applied once already
//!     ▼
//!  correlate ─► instance id           (no id: not this saga's; ignored)
//!     ▼
//!  SELECT … FOR UPDATE the instance   (none: start() may create it)
//!     │   concurrent events of one instance wait here, one at a time
//!     ▼
//!  on_event / on_timeout ─► Transition: next state, data, commands to
//!     │   send, timeouts to schedule or cancel, complete or fail
//!     │   (or unexpected: the saga's rule ignores, retries or fails it)
//!     ▼
//!  commands appended to the outbox, timeouts written as delayed outbox
//!  events, the instance row updated ─► COMMIT with the dedupe row
//! ```
//!
//! Everything a transition does commits in one transaction, or nothing
//! does: a crash at any point leaves the instance as it was before the
//! event, and the event is delivered again. A timeout is a delayed outbox
//! event (`outbox_core`, migration V10) of type `<NAME>.timeout`, published
//! when due by the relay that serves this database, and consumed by this
//! same saga. The instance remembers each pending timeout's event id; a
//! timeout that was cancelled, replaced, or outlived its step finds a
//! different id (or none) and changes nothing. So the saga's database needs
//! the outbox schema and a relay, and its consumer must read the timeout
//! topic (by default the relay's template applied to `NAME`).
//!
//! `docs/sagas.md` walks through a definition; the sample app's checkout
//! (`sample-app/src/checkout.rs`) is a complete one.

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use outbox_core::{append, AppendError, NewEvent};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sqlx::{PgPool, PgTransaction, Row};
use tracing::debug;
use uuid::Uuid;

use crate::{telemetry, Envelope, Handler, HandlerError};

/// An event as a saga sees it: any JSON payload. Decode the fields you need
/// with [`payload_as`].
pub type SagaEvent = Envelope<serde_json::Value>;

/// Decodes `event`'s payload as `T`; a payload that does not fit is a
/// permanent error (the event is dead-lettered).
pub fn payload_as<T: DeserializeOwned>(event: &SagaEvent) -> Result<T, HandlerError> {
    T::deserialize(&event.payload).map_err(|e| {
        HandlerError::permanent(format!(
            "the payload of {} {} does not fit: {e}",
            event.event_type, event.event_id
        ))
    })
}

/// What happens to an event that does not fit the instance's state (the
/// transition returned [`Transition::unexpected`]) or that names no
/// instance while it cannot start one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Unexpected {
    /// Recorded as processed and dropped; the instance does not change.
    /// The default.
    #[default]
    Ignore,
    /// A retryable error: tried again with back-off (it may fit once an
    /// earlier event arrived), then dead-lettered; under park-key the
    /// instance's later events wait behind it.
    Retry,
    /// A permanent error: dead-lettered at once.
    Fail,
}

/// An orchestrated saga's definition. See the module docs for the flow and
/// `docs/sagas.md` for an example.
#[async_trait::async_trait]
pub trait Saga: Send + Sync + 'static {
    /// The saga's name: its instances' rows carry it, its timeouts are
    /// events of type `<NAME>.timeout`, and its metrics are labelled with it.
    const NAME: &'static str;
    /// The states, usually an enum of unit variants (stored as their serde
    /// name).
    type State: Serialize + DeserializeOwned + fmt::Debug + Clone + PartialEq + Send + Sync;
    /// The instance's own data, stored as JSON.
    type Data: Serialize + DeserializeOwned + Send + Sync;

    /// The event types the saga reacts to (its timeouts come on their own).
    fn events(&self) -> Vec<String>;

    /// The instance `event` belongs to: a header or a payload field.
    /// `None`: the event is not this saga's concern, and is ignored.
    fn correlate(&self, event: &SagaEvent) -> Option<String>;

    /// For an event whose instance does not exist yet: the state and data
    /// to start one with (then [`Saga::on_event`] runs on it). `None`, the
    /// default: the event is unexpected ([`Saga::unexpected`]).
    fn start(&self, _event: &SagaEvent) -> Option<(Self::State, Self::Data)> {
        None
    }

    /// Reacts to `event`. `instance.data` may be changed in place; the
    /// transaction is the one the instance, the commands and the dedupe row
    /// commit in (use it for the saga's own tables too).
    async fn on_event(
        &self,
        event: &SagaEvent,
        instance: &mut Instance<Self>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<Transition<Self::State>, HandlerError>;

    /// Reacts to the timeout `name` that fired: it was scheduled by a
    /// transition and neither cancelled nor replaced since.
    async fn on_timeout(
        &self,
        name: &str,
        instance: &mut Instance<Self>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<Transition<Self::State>, HandlerError>;

    /// The rule for events that do not fit. Default [`Unexpected::Ignore`].
    fn unexpected(&self) -> Unexpected {
        Unexpected::Ignore
    }

    /// The topic of the timeout events. Default `None`: the relay's topic
    /// template, applied to the aggregate type `NAME`.
    fn timeout_topic(&self) -> Option<String> {
        None
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Status {
    /// Reacting to events.
    Running,
    /// A transition completed it.
    Completed,
    /// A transition (or an operator) failed it.
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            _ => Status::Running,
        }
    }
}

/// A pending timeout: the delayed outbox event that fires it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTimeout {
    /// When it fires.
    pub due_at: DateTime<Utc>,
    /// The timeout event's id.
    pub event_id: Uuid,
}

/// One saga instance, locked for the transition.
pub struct Instance<S: Saga + ?Sized> {
    /// The correlation id.
    pub id: String,
    /// The current state (change it through [`Transition::to`]).
    pub state: S::State,
    /// The saga's data; changes are stored with the transition.
    pub data: S::Data,
    /// Running, or how it finished.
    pub status: Status,
    /// Transitions applied so far.
    pub version: i64,
    /// When the instance started.
    pub started_at: DateTime<Utc>,
    /// Pending timeouts by name.
    pub timeouts: BTreeMap<String, PendingTimeout>,
}

impl<S: Saga + ?Sized> fmt::Debug for Instance<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instance")
            .field("saga", &S::NAME)
            .field("id", &self.id)
            .field("state", &self.state)
            .field("status", &self.status)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Finish {
    Completed,
    Failed(String),
}

/// What a transition does; built with the chained calls below.
#[derive(Debug)]
#[must_use]
pub struct Transition<St> {
    to: Option<St>,
    finish: Option<Finish>,
    send: Vec<NewEvent>,
    schedule: Vec<(String, Duration)>,
    cancel: Vec<String>,
    unexpected: Option<String>,
}

impl<St> Transition<St> {
    fn new() -> Self {
        Self {
            to: None,
            finish: None,
            send: Vec::new(),
            schedule: Vec::new(),
            cancel: Vec::new(),
            unexpected: None,
        }
    }

    /// Moves to `state`.
    pub fn to(state: St) -> Self {
        Self {
            to: Some(state),
            ..Self::new()
        }
    }

    /// Keeps the state (the data, commands and timeouts still apply).
    pub fn stay() -> Self {
        Self::new()
    }

    /// The event does not fit the current state: [`Saga::unexpected`]
    /// decides, and nothing else of this transition applies.
    pub fn unexpected(why: impl Into<String>) -> Self {
        Self {
            unexpected: Some(why.into()),
            ..Self::new()
        }
    }

    /// Appends `event` (a command or an event) to the outbox, in the
    /// transition's transaction. Its causation id defaults to the event
    /// that caused the transition, its correlation id to that event's, or
    /// else to the instance id.
    pub fn send(mut self, event: NewEvent) -> Self {
        self.send.push(event);
        self
    }

    /// Fires the timeout `name` after `after`, unless cancelled first. A
    /// pending timeout of the same name is replaced.
    pub fn schedule(mut self, name: impl Into<String>, after: Duration) -> Self {
        self.schedule.push((name.into(), after));
        self
    }

    /// Cancels the pending timeout `name`, if any.
    pub fn cancel(mut self, name: impl Into<String>) -> Self {
        self.cancel.push(name.into());
        self
    }

    /// Completes the instance; its pending timeouts are cancelled.
    pub fn complete(mut self) -> Self {
        self.finish = Some(Finish::Completed);
        self
    }

    /// Fails the instance (after compensating, if it must); its pending
    /// timeouts are cancelled.
    pub fn fail(mut self, reason: impl Into<String>) -> Self {
        self.finish = Some(Finish::Failed(reason.into()));
        self
    }
}

/// The timeout event's payload.
#[derive(Debug, Serialize, Deserialize)]
struct Fired {
    saga: String,
    instance_id: String,
    name: String,
}

/// The event type of `S`'s timeouts.
pub fn timeout_type<S: Saga>() -> String {
    format!("{}.timeout", S::NAME)
}

/// A [`Saga`] as a [`Handler`] of its events and timeouts
/// ([`crate::ConsumerBuilder::saga`] registers it).
pub(crate) struct SagaHandler<S>(pub(crate) Arc<S>);

#[async_trait::async_trait]
impl<S: Saga> Handler for SagaHandler<S> {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        event: &SagaEvent,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let saga = &*self.0;
        if event.event_type == timeout_type::<S>() {
            return fire(saga, event, tx).await;
        }
        let Some(id) = saga.correlate(event) else {
            debug!(saga = S::NAME, event.id = %event.event_id, "not this saga's event");
            return Ok(());
        };
        let mut instance = match load::<S>(tx, &id).await? {
            Some(i) => i,
            None => match saga.start(event) {
                Some((state, data)) => create::<S>(tx, &id, &state, &data).await?,
                None => return unexpected(saga, event, "no instance to apply it to"),
            },
        };
        let from = instance.state.clone();
        let t = saga.on_event(event, &mut instance, tx).await?;
        apply(saga, event, instance, from, t, tx).await
    }
}

/// A timeout event: fires if the instance still waits for it.
async fn fire<S: Saga>(
    saga: &S,
    event: &SagaEvent,
    tx: &mut PgTransaction<'static>,
) -> Result<(), HandlerError> {
    let fired: Fired = payload_as(event)?;
    let Some(mut instance) = load::<S>(tx, &fired.instance_id).await? else {
        return Ok(());
    };
    let current = instance.timeouts.get(&fired.name).map(|t| t.event_id);
    if current != Some(event.event_id) {
        // Cancelled, replaced, or its step is over: a no-op.
        telemetry::saga_timeout(S::NAME, "stale");
        return Ok(());
    }
    instance.timeouts.remove(&fired.name);
    telemetry::saga_timeout(S::NAME, "fired");
    let from = instance.state.clone();
    let t = saga.on_timeout(&fired.name, &mut instance, tx).await?;
    apply(saga, event, instance, from, t, tx).await
}

fn unexpected<S: Saga>(saga: &S, event: &SagaEvent, why: &str) -> Result<(), HandlerError> {
    telemetry::saga_unexpected(S::NAME);
    let msg = format!(
        "saga {}: {} {} does not fit: {why}",
        S::NAME,
        event.event_type,
        event.event_id
    );
    match saga.unexpected() {
        Unexpected::Ignore => {
            debug!("{msg}; ignored");
            Ok(())
        }
        Unexpected::Retry => Err(HandlerError::retryable(msg)),
        Unexpected::Fail => Err(HandlerError::permanent(msg)),
    }
}

/// Writes what the transition decided, in `tx`.
async fn apply<S: Saga>(
    saga: &S,
    cause: &SagaEvent,
    mut instance: Instance<S>,
    from: S::State,
    t: Transition<S::State>,
    tx: &mut PgTransaction<'static>,
) -> Result<(), HandlerError> {
    if let Some(why) = &t.unexpected {
        return unexpected(saga, cause, &format!("{why} (state {from:?})"));
    }
    let finishing = t.finish.is_some();
    let mut gone: Vec<Uuid> = Vec::new();
    for name in &t.cancel {
        gone.extend(instance.timeouts.remove(name).map(|p| p.event_id));
    }
    if finishing {
        gone.extend(
            std::mem::take(&mut instance.timeouts)
                .into_values()
                .map(|p| p.event_id),
        );
    }
    if !gone.is_empty() {
        // A timeout still waiting in the outbox is deleted; one already on
        // its way finds no pending timeout of its id, and changes nothing.
        sqlx::query("DELETE FROM outbox_delayed WHERE event_id = ANY($1)")
            .bind(&gone)
            .execute(&mut **tx)
            .await?;
    }
    if !finishing {
        for (name, after) in &t.schedule {
            if let Some(old) = instance.timeouts.remove(name) {
                sqlx::query("DELETE FROM outbox_delayed WHERE event_id = $1")
                    .bind(old.event_id)
                    .execute(&mut **tx)
                    .await?;
            }
            let fired = Fired {
                saga: S::NAME.into(),
                instance_id: instance.id.clone(),
                name: name.clone(),
            };
            let mut e = NewEvent::new(S::NAME, instance.id.clone(), timeout_type::<S>())
                .json_payload(&fired)
                .map_err(appended)?
                .delayed_by(*after);
            e.topic = saga.timeout_topic();
            let due_at = e.not_before.unwrap_or_else(Utc::now);
            let event_id = e.event_id;
            send(&mut instance, cause, e, tx).await?;
            instance
                .timeouts
                .insert(name.clone(), PendingTimeout { due_at, event_id });
        }
    }
    let (status, reason) = match &t.finish {
        None => (instance.status, None),
        Some(Finish::Completed) => (Status::Completed, None),
        Some(Finish::Failed(why)) => (Status::Failed, Some(why.clone())),
    };
    // What a failing or failed instance sends undoes earlier steps.
    let compensations = if status == Status::Failed {
        t.send.len()
    } else {
        0
    };
    for e in t.send {
        send(&mut instance, cause, e, tx).await?;
    }
    let to = t.to.unwrap_or(from.clone());
    sqlx::query(
        "UPDATE consumer_kit_sagas SET state = $3, data = $4, status = $5, timeouts = $6, \
             version = version + 1, updated_at = now(), \
             finished_at = CASE WHEN $5 <> 'running' THEN coalesce(finished_at, now()) END, \
             reason = coalesce($7, reason) \
         WHERE saga = $1 AND instance_id = $2",
    )
    .bind(S::NAME)
    .bind(&instance.id)
    .bind(state_text(&to)?)
    .bind(sqlx::types::Json(&instance.data))
    .bind(status.as_str())
    .bind(sqlx::types::Json(&instance.timeouts))
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    telemetry::saga_transition(S::NAME, &state_text(&from)?, &state_text(&to)?);
    if status != instance.status {
        telemetry::saga_finished(S::NAME, status.as_str());
    }
    telemetry::saga_compensations(S::NAME, compensations);
    debug!(saga = S::NAME, instance = %instance.id, from = ?from, to = ?to,
           status = status.as_str(), event.id = %cause.event_id, "saga transition");
    Ok(())
}

/// Appends `e` for the instance, with the cause's ids as defaults.
async fn send<S: Saga>(
    instance: &mut Instance<S>,
    cause: &SagaEvent,
    mut e: NewEvent,
    tx: &mut PgTransaction<'static>,
) -> Result<(), HandlerError> {
    if e.causation_id.is_none() {
        e.causation_id = Some(cause.event_id.to_string());
    }
    if e.correlation_id.is_none() {
        e.correlation_id = Some(
            cause
                .correlation_id
                .clone()
                .unwrap_or_else(|| instance.id.clone()),
        );
    }
    append(&mut **tx, &e).await.map_err(appended)?;
    Ok(())
}

fn appended(e: AppendError) -> HandlerError {
    match e {
        AppendError::Database(db) => HandlerError::from(db),
        other => HandlerError::permanent(other),
    }
}

/// The state as stored: its serde name when it serializes to a string,
/// else its JSON.
fn state_text<St: Serialize>(state: &St) -> Result<String, HandlerError> {
    match serde_json::to_value(state) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        Ok(other) => Ok(other.to_string()),
        Err(e) => Err(HandlerError::permanent(format!(
            "the saga state does not serialize: {e}"
        ))),
    }
}

fn parse_state<St: DeserializeOwned>(text: &str) -> Result<St, HandlerError> {
    serde_json::from_value(serde_json::Value::String(text.into()))
        .or_else(|_| serde_json::from_str(text))
        .map_err(|e| HandlerError::permanent(format!("stored saga state {text:?}: {e}")))
}

const SELECT: &str = "SELECT instance_id, state, data, status, version, started_at, timeouts \
     FROM consumer_kit_sagas WHERE saga = $1 AND instance_id = $2";

/// The instance, locked until the transaction ends.
async fn load<S: Saga>(
    tx: &mut PgTransaction<'static>,
    id: &str,
) -> Result<Option<Instance<S>>, HandlerError> {
    let Some(row) = sqlx::query(&format!("{SELECT} FOR UPDATE"))
        .bind(S::NAME)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
    else {
        return Ok(None);
    };
    let data: serde_json::Value = row.try_get("data")?;
    let timeouts: sqlx::types::Json<BTreeMap<String, PendingTimeout>> = row.try_get("timeouts")?;
    Ok(Some(Instance {
        id: row.try_get("instance_id")?,
        state: parse_state(row.try_get::<&str, _>("state")?)?,
        data: serde_json::from_value(data).map_err(|e| {
            HandlerError::permanent(format!("stored data of saga {} {id}: {e}", S::NAME))
        })?,
        status: Status::parse(row.try_get::<&str, _>("status")?),
        version: row.try_get("version")?,
        started_at: row.try_get("started_at")?,
        timeouts: timeouts.0,
    }))
}

/// Starts an instance, or locks the one a concurrent event started first.
async fn create<S: Saga>(
    tx: &mut PgTransaction<'static>,
    id: &str,
    state: &S::State,
    data: &S::Data,
) -> Result<Instance<S>, HandlerError> {
    sqlx::query(
        "INSERT INTO consumer_kit_sagas (saga, instance_id, state, data) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (saga, instance_id) DO NOTHING",
    )
    .bind(S::NAME)
    .bind(id)
    .bind(state_text(state)?)
    .bind(sqlx::types::Json(data))
    .execute(&mut **tx)
    .await?;
    load::<S>(tx, id).await?.ok_or_else(|| {
        HandlerError::retryable(format!("saga {} {id}: created but not found", S::NAME))
    })
}

/// One instance as the operator sees it (any saga, data as JSON).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct InstanceRow {
    /// The saga's name.
    pub saga: String,
    /// The correlation id.
    pub instance_id: String,
    /// The state, as stored.
    pub state: String,
    /// `running`, `completed` or `failed`.
    pub status: String,
    /// Transitions applied.
    pub version: i64,
    /// The saga's data.
    pub data: serde_json::Value,
    /// Pending timeouts.
    pub timeouts: serde_json::Value,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last transition.
    pub updated_at: DateTime<Utc>,
    /// Why it failed.
    pub reason: Option<String>,
}

/// Which instances [`list`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this state.
    pub state: Option<String>,
    /// Only this status (`running`, `completed`, `failed`).
    pub status: Option<String>,
    /// Only instances whose last transition is at least this old (stuck).
    pub unchanged_for: Option<Duration>,
    /// At most this many, oldest transition first. Default (0): 100.
    pub limit: i64,
}

impl ListFilter {
    /// Running instances whose last transition is at least `age` old.
    pub fn stuck_for(age: Duration) -> Self {
        Self {
            status: Some("running".into()),
            unchanged_for: Some(age),
            ..Self::default()
        }
    }
}

const ROW: &str = "SELECT saga, instance_id, state, status, version, data, timeouts, started_at, \
     updated_at, reason FROM consumer_kit_sagas";

fn instance_row(r: &sqlx::postgres::PgRow) -> Result<InstanceRow, sqlx::Error> {
    Ok(InstanceRow {
        saga: r.try_get("saga")?,
        instance_id: r.try_get("instance_id")?,
        state: r.try_get("state")?,
        status: r.try_get("status")?,
        version: r.try_get("version")?,
        data: r.try_get("data")?,
        timeouts: r.try_get("timeouts")?,
        started_at: r.try_get("started_at")?,
        updated_at: r.try_get("updated_at")?,
        reason: r.try_get("reason")?,
    })
}

/// Instances of `saga` matching `filter`, oldest last transition first.
pub async fn list(
    pool: &PgPool,
    saga: &str,
    filter: &ListFilter,
) -> Result<Vec<InstanceRow>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "{ROW} WHERE saga = $1 AND ($2::text IS NULL OR state = $2) \
           AND ($3::text IS NULL OR status = $3) \
           AND ($4::float8 IS NULL OR updated_at <= now() - make_interval(secs => $4)) \
         ORDER BY updated_at LIMIT $5"
    ))
    .bind(saga)
    .bind(&filter.state)
    .bind(&filter.status)
    .bind(filter.unchanged_for.map(|d| d.as_secs_f64()))
    .bind(if filter.limit > 0 { filter.limit } else { 100 })
    .fetch_all(pool)
    .await?;
    rows.iter().map(instance_row).collect()
}

/// One instance, or `None`.
pub async fn show(
    pool: &PgPool,
    saga: &str,
    instance_id: &str,
) -> Result<Option<InstanceRow>, sqlx::Error> {
    let row = sqlx::query(&format!("{ROW} WHERE saga = $1 AND instance_id = $2"))
        .bind(saga)
        .bind(instance_id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(instance_row).transpose()
}

/// Makes the pending timeouts of a running instance due now: its step's
/// own timeout handling runs (retrying or compensating, as the saga
/// decides), through the relay and the consumer as usual. The operator's
/// "retry" for an instance stuck in a state. Returns how many timeout
/// events were brought forward (0: none pending, or they were on their way
/// already).
pub async fn expire_timeouts(
    pool: &PgPool,
    saga: &str,
    instance_id: &str,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE outbox_delayed SET not_before = clock_timestamp() \
         WHERE event_id IN ( \
             SELECT (t.value ->> 'event_id')::uuid FROM consumer_kit_sagas s, \
                    jsonb_each(s.timeouts) t \
             WHERE s.saga = $1 AND s.instance_id = $2 AND s.status = 'running')",
    )
    .bind(saga)
    .bind(instance_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Fails a running instance **without** compensating: its pending
/// timeouts are deleted and it reacts to nothing by itself any more (its
/// transitions still run for late events, which the saga may answer with
/// compensation). The operator's last resort, for an instance whose
/// effects were settled by hand. Returns whether an instance was failed.
pub async fn abandon(
    pool: &PgPool,
    saga: &str,
    instance_id: &str,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let timeouts: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT timeouts FROM consumer_kit_sagas WHERE saga = $1 AND instance_id = $2 \
           AND status = 'running' FOR UPDATE",
    )
    .bind(saga)
    .bind(instance_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(timeouts) = timeouts else {
        return Ok(false);
    };
    let ids: Vec<Uuid> = timeouts
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|t| t.get("event_id")?.as_str()?.parse().ok())
        .collect();
    sqlx::query("DELETE FROM outbox_delayed WHERE event_id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE consumer_kit_sagas SET status = 'failed', timeouts = '{}', reason = $3, \
             updated_at = now(), finished_at = now() \
         WHERE saga = $1 AND instance_id = $2",
    )
    .bind(saga)
    .bind(instance_id)
    .bind(format!("abandoned by an operator: {reason}"))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    telemetry::saga_finished(saga, "failed");
    Ok(true)
}

/// Instance counts of `saga` by (status, state).
pub async fn counts(pool: &PgPool, saga: &str) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status, state, count(*) FROM consumer_kit_sagas WHERE saga = $1 \
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(saga)
    .fetch_all(pool)
    .await
}

/// How often [`report`] refreshes the instance gauges.
const REPORT_EVERY: Duration = Duration::from_secs(15);

/// Refreshes the instances-by-state gauges of `sagas` until `stop`.
pub(crate) async fn report(
    pool: PgPool,
    sagas: Vec<&'static str>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut seen: BTreeMap<(&'static str, String, String), ()> = BTreeMap::new();
    loop {
        for saga in &sagas {
            match counts(&pool, saga).await {
                Ok(rows) => {
                    let now: BTreeMap<_, _> = rows
                        .into_iter()
                        .map(|(status, state, n)| ((*saga, status, state), n))
                        .collect();
                    for key in seen
                        .keys()
                        .filter(|k| k.0 == *saga && !now.contains_key(*k))
                    {
                        telemetry::saga_instances(key.0, &key.1, &key.2, 0);
                    }
                    seen.retain(|k, _| k.0 != *saga);
                    for ((s, status, state), n) in now {
                        telemetry::saga_instances(s, &status, &state, n);
                        seen.insert((s, status, state), ());
                    }
                }
                Err(e) => debug!(error = %e, saga, "cannot count saga instances"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REPORT_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}
