//! [`Handler`]: your code, run once per event inside the dedupe transaction.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use sqlx::PgTransaction;

use crate::envelope::{DecodeError, Envelope, RawEnvelope};

/// A boxed error from a handler.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How a handler failed. The transaction is rolled back either way, so none
/// of the handler's writes (nor the dedupe row) remain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// May succeed later (a lock timeout, a remote service that is down): the
    /// message is retried with backoff, up to
    /// [`crate::ConsumerConfig::max_attempts`] tries, then dead-lettered.
    #[error("retryable: {0}")]
    Retryable(#[source] BoxError),
    /// Will never succeed as it is (a business rule refuses it, the payload
    /// is wrong): the message goes to the dead-letter topic at once.
    #[error("permanent: {0}")]
    Permanent(#[source] BoxError),
}

impl HandlerError {
    /// A retryable error from anything printable or any error.
    pub fn retryable(err: impl Into<BoxError>) -> Self {
        Self::Retryable(err.into())
    }

    /// A permanent error from anything printable or any error.
    pub fn permanent(err: impl Into<BoxError>) -> Self {
        Self::Permanent(err.into())
    }

    /// Whether a retry may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

/// Database errors from a handler's own statements: a constraint or data
/// error (SQLSTATE classes 22 and 23) is permanent; everything else (lost
/// connections, serialization failures, deadlocks, timeouts) is retryable.
impl From<sqlx::Error> for HandlerError {
    fn from(err: sqlx::Error) -> Self {
        let permanent = match &err {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => true,
            _ => false,
        };
        if permanent {
            Self::Permanent(err.into())
        } else {
            Self::Retryable(err.into())
        }
    }
}

/// Handles one event type.
///
/// `handle` runs inside the transaction that also records the event in
/// `processed_events`: make every side effect through `tx` and they commit
/// together, exactly once per consumer group. Return `Ok(())` to commit. The
/// same envelope may be handled again after a retryable error, or after
/// another message of its batch failed and the batch's transaction rolled
/// back ([`crate::ConsumerConfig::max_batch`]), so do not keep state outside
/// the transaction.
///
/// ```
/// use consumer_kit::{Envelope, Handler, HandlerError};
///
/// #[derive(serde::Deserialize)]
/// struct OrderCreated { order_id: i64, amount_cents: i64 }
///
/// struct Revenue;
///
/// #[async_trait::async_trait]
/// impl Handler for Revenue {
///     type Payload = OrderCreated;
///     async fn handle(
///         &self,
///         event: &Envelope<OrderCreated>,
///         tx: &mut sqlx::PgTransaction<'static>,
///     ) -> Result<(), HandlerError> {
///         if event.payload.amount_cents < 0 {
///             return Err(HandlerError::permanent("negative amount"));
///         }
///         sqlx::query("UPDATE revenue SET cents = cents + $1")
///             .bind(event.payload.amount_cents)
///             .execute(&mut **tx)
///             .await?; // sqlx errors classify themselves
///         Ok(())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The payload type, deserialized from the record's JSON value. A value
    /// that does not fit is dead-lettered without calling the handler.
    type Payload: DeserializeOwned + Send + Sync + 'static;

    /// Applies `event` through `tx`.
    async fn handle(
        &self,
        event: &Envelope<Self::Payload>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError>;
}

/// A handler with its payload type erased, so handlers of different payload
/// types share one routing table.
pub(crate) trait Route: Send + Sync {
    /// Decodes the payload once; the result is applied (maybe several times).
    fn prepare(&self, raw: &RawEnvelope) -> Result<Box<dyn Prepared>, DecodeError>;
}

/// A decoded event bound to its handler.
pub(crate) trait Prepared: Send + Sync {
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgTransaction<'static>,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

pub(crate) struct TypedRoute<H>(pub(crate) Arc<H>);

struct TypedPrepared<H: Handler> {
    handler: Arc<H>,
    event: Envelope<H::Payload>,
}

impl<H: Handler> Route for TypedRoute<H> {
    fn prepare(&self, raw: &RawEnvelope) -> Result<Box<dyn Prepared>, DecodeError> {
        Ok(Box::new(TypedPrepared {
            handler: Arc::clone(&self.0),
            event: raw.typed::<H::Payload>()?,
        }))
    }
}

impl<H: Handler> Prepared for TypedPrepared<H> {
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgTransaction<'static>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.handler.handle(&self.event, tx)
    }
}
