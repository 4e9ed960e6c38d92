//! A small saga for the saga tests: a booking asks a seat service to
//! reserve a seat, and gives up (releasing the seat) when no answer comes
//! within [`Booking::answer_timeout`].
//!
//! ```text
//! booking.requested ─► Reserving: send seat.reserve, timeout "answer"
//!   seat.reserved ─► Confirmed (completed), timeout cancelled
//!   seat.refused  ─► Failed
//!   timeout       ─► Failed, send seat.release
//! seat.reserved after Failed ─► send seat.release (the late answer is undone)
//! booking.touch, any state ─► data.touched + 1 (the concurrency test)
//! ```
//!
//! Every transition logs the event in `booking_log` through the
//! transition's transaction, a table with no unique constraint, so an
//! event applied twice shows.

use std::time::Duration;

use consumer_kit::{
    saga::{payload_as, Instance, Unexpected},
    HandlerError, Saga, SagaEvent, Transition,
};
use outbox_core::NewEvent;
use serde::{Deserialize, Serialize};

/// The saga's states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Waiting for the seat service.
    Reserving,
    /// The seat is reserved.
    Confirmed,
    /// Refused, or no answer in time.
    Failed,
}

/// The instance's data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Data {
    /// Seats asked for.
    pub seats: i64,
    /// Transitions applied (each adds one).
    pub touched: i64,
}

/// The saga, with its topics and timings.
#[derive(Debug, Clone)]
pub struct Booking {
    /// Where its commands go.
    pub commands_topic: String,
    /// Where its timeout events go.
    pub timeout_topic: String,
    /// How long it waits for the seat service.
    pub answer_timeout: Duration,
    /// How long a transition sleeps after its writes, before it returns
    /// (so that a test can kill the consumer in the middle of one).
    pub pause: Duration,
    /// Its rule for events that do not fit.
    pub unexpected: Unexpected,
}

/// `booking_log`: every event a transition applied.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS booking_log (
    booking_id text NOT NULL, event_type text NOT NULL, event_id uuid NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp())";

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    seats: i64,
}

impl Booking {
    fn command(&self, booking: &str, kind: &str) -> NewEvent {
        NewEvent::new("seat", booking, kind)
            .topic(&self.commands_topic)
            .json_payload(&serde_json::json!({ "booking_id": booking }))
            .expect("json")
    }
}

#[consumer_kit::async_trait]
impl Saga for Booking {
    const NAME: &'static str = "booking";
    type State = State;
    type Data = Data;

    fn events(&self) -> Vec<String> {
        [
            "booking.requested",
            "seat.reserved",
            "seat.refused",
            "booking.touch",
        ]
        .map(String::from)
        .to_vec()
    }

    fn correlate(&self, event: &SagaEvent) -> Option<String> {
        event.payload["booking_id"].as_str().map(String::from)
    }

    fn start(&self, event: &SagaEvent) -> Option<(State, Data)> {
        (event.event_type == "booking.requested").then(|| {
            let seats = payload_as::<Payload>(event).map_or(1, |p| p.seats);
            (State::Reserving, Data { seats, touched: 0 })
        })
    }

    async fn on_event(
        &self,
        event: &SagaEvent,
        me: &mut Instance<Self>,
        tx: &mut sqlx::PgTransaction<'static>,
    ) -> Result<Transition<State>, HandlerError> {
        let t = match (event.event_type.as_str(), me.state) {
            ("booking.requested", State::Reserving) if me.version == 0 => Transition::stay()
                .send(self.command(&me.id, "seat.reserve"))
                .schedule("answer", self.answer_timeout),
            ("seat.reserved", State::Reserving) => {
                Transition::to(State::Confirmed).cancel("answer").complete()
            }
            ("seat.refused", State::Reserving) => Transition::to(State::Failed).fail("refused"),
            ("seat.reserved", State::Failed) => {
                Transition::stay().send(self.command(&me.id, "seat.release"))
            }
            ("booking.touch", _) => Transition::stay(),
            (other, state) => {
                return Ok(Transition::unexpected(format!("{other} in {state:?}")));
            }
        };
        me.data.touched += 1;
        sqlx::query(
            "INSERT INTO booking_log (booking_id, event_type, event_id) VALUES ($1, $2, $3)",
        )
        .bind(&me.id)
        .bind(&event.event_type)
        .bind(event.event_id)
        .execute(&mut **tx)
        .await?;
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        Ok(t)
    }

    async fn on_timeout(
        &self,
        name: &str,
        me: &mut Instance<Self>,
        tx: &mut sqlx::PgTransaction<'static>,
    ) -> Result<Transition<State>, HandlerError> {
        if name != "answer" || me.state != State::Reserving {
            return Ok(Transition::unexpected(format!(
                "timeout {name} in {:?}",
                me.state
            )));
        }
        me.data.touched += 1;
        sqlx::query("INSERT INTO booking_log (booking_id, event_type, event_id) VALUES ($1, 'timeout', gen_random_uuid())")
            .bind(&me.id)
            .execute(&mut **tx)
            .await?;
        Ok(Transition::to(State::Failed)
            .send(self.command(&me.id, "seat.release"))
            .fail("no answer in time"))
    }

    fn unexpected(&self) -> Unexpected {
        self.unexpected
    }

    fn timeout_topic(&self) -> Option<String> {
        Some(self.timeout_topic.clone())
    }
}
