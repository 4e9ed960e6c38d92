//! [`Health`]: what `/readyz` reports. Ready means the relay can publish
//! *now*, not that it could a minute ago.
//!
//! Three sources make up the answer, read when asked:
//!
//! - the publish loop's *phase* ([`State`]) and its reason, set as it
//!   starts, claims, fails and stops;
//! - the producer's connection to the cluster ([`outbox_kafka::Reach`]):
//!   librdkafka reports its broker connections every second, and an outage
//!   the moment the last connection drops;
//! - the batch in flight: records sent [`STALLED_AFTER`] ago and still not
//!   acknowledged (a dead partition leader while other brokers are up).
//!
//! | phase | broker | batch in flight | `/readyz` | body starts with |
//! |---|---|---|---|---|
//! | starting (no lease yet) | any | none | 503 | `starting:` |
//! | active or standby | not heard from yet | any | 503 | `starting: connecting to Kafka` |
//! | active or standby | no broker connected | any | 503 | `degraded: kafka: no broker connected` |
//! | active | connected | unacknowledged ≥ 5 s | 503 | `degraded: kafka: … not acknowledged` |
//! | active | connected | none, or younger | 200 | `active:` |
//! | standby (other relays own every partition) | connected | none | 200 | `standby:` |
//! | degraded (database down, batch failed, lease failing) | any | any | 503 | `degraded:` |
//! | stopping | any | any | 503 | `stopping:` |

use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use outbox_kafka::{Connection, Reach};

/// A batch whose records are not all acknowledged this long after they were
/// sent makes the relay not ready. Acknowledgements normally take
/// milliseconds; a leader failover pauses them for a few seconds.
pub const STALLED_AFTER: Duration = Duration::from_secs(5);

/// The relay's state, as seen by readiness probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum State {
    /// Not publishing yet: waiting for its share of the partitions, or for
    /// its first connection to Kafka.
    Starting = 0,
    /// Connected, owning no partition: other relays own them all.
    Standby = 1,
    /// Claiming and publishing.
    Active = 2,
    /// Database or broker unavailable; retrying with backoff.
    Degraded = 3,
    /// Shutting down.
    Stopping = 4,
}

impl State {
    /// The state's name, as `/readyz` prints it.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Standby => "standby",
            State::Active => "active",
            State::Degraded => "degraded",
            State::Stopping => "stopping",
        }
    }

    fn from_u8(n: u8) -> State {
        match n {
            0 => State::Starting,
            1 => State::Standby,
            2 => State::Active,
            3 => State::Degraded,
            _ => State::Stopping,
        }
    }
}

/// Shared health state: the publish loop sets its phase, the producer's
/// context its connection, and readers combine them.
#[derive(Debug)]
pub struct Health {
    phase: AtomicU8,
    reason: Mutex<String>,
    broker: Arc<Reach>,
    /// The broker's name in reasons: `kafka` or `rabbitmq`.
    broker_name: &'static str,
    /// When the records of the batch in flight were sent, and how many.
    awaiting: Mutex<Option<(Instant, usize)>>,
}

impl Default for Health {
    /// A health whose broker connection is never heard of: it starts as
    /// [`State::Starting`] and cannot become ready until a
    /// [`Reach`] says connected (see `Health::new`).
    fn default() -> Self {
        Self::new(Arc::new(Reach::default()))
    }
}

impl Health {
    /// Starts in [`State::Starting`], reading the broker connection from
    /// `broker`.
    pub(crate) fn new(broker: Arc<Reach>) -> Self {
        Self::naming(broker, "kafka")
    }

    /// [`Health::new`] for a broker named `broker_name` in the reasons.
    pub(crate) fn naming(broker: Arc<Reach>, broker_name: &'static str) -> Self {
        Self {
            phase: AtomicU8::new(State::Starting as u8),
            reason: Mutex::new("waiting for its share of the outbox partitions".into()),
            broker,
            broker_name,
            awaiting: Mutex::new(None),
        }
    }

    /// Sets the loop's phase and a one-line reason (never a secret).
    pub(crate) fn set(&self, state: State, reason: impl Into<String>) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.into();
        self.phase.store(state as u8, Ordering::Relaxed);
    }

    /// A database connection was lost (the LISTEN connection's, say):
    /// degraded until a batch goes through, unless already stopping.
    pub(crate) fn database_lost(&self, why: &str) {
        if self.phase() != State::Stopping {
            self.set(State::Degraded, format!("database: {why}"));
        }
    }

    /// The phase the loop last set (without the broker's connection).
    pub(crate) fn phase(&self) -> State {
        State::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// The reason the loop last gave.
    pub(crate) fn phase_reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notes that `records` were just sent; until the returned guard is
    /// dropped, they count as awaiting their acknowledgement.
    pub(crate) fn awaiting(&self, records: usize) -> Awaiting<'_> {
        *self.awaiting.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), records));
        Awaiting(self)
    }

    /// The state and reason now, from all three sources (see the table at
    /// the top of this module).
    pub fn now(&self) -> (State, String) {
        let phase = self.phase();
        let reason = self.phase_reason();
        if matches!(phase, State::Starting | State::Stopping) {
            return (phase, reason);
        }
        match self.broker.now() {
            Connection::Up => {}
            Connection::Down { down_for, why } => {
                let broker = format!(
                    "{}: no broker connected for {} s: {why}",
                    self.broker_name,
                    down_for.as_secs()
                );
                return match phase {
                    // The loop's own failure says more, unless it is this one.
                    State::Degraded if !reason.starts_with(self.broker_name) => {
                        (State::Degraded, format!("{reason}; and {broker}"))
                    }
                    _ => (State::Degraded, broker),
                };
            }
            _ if phase == State::Degraded => {}
            _ => {
                return (
                    State::Starting,
                    format!("connecting to {}", self.broker_name),
                )
            }
        }
        if phase == State::Active {
            let awaiting = *self.awaiting.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((sent, records)) = awaiting {
                let waited = sent.elapsed();
                if waited >= STALLED_AFTER {
                    return (
                        State::Degraded,
                        format!(
                            "{}: {records} records sent {} s ago are not acknowledged yet",
                            self.broker_name,
                            waited.as_secs()
                        ),
                    );
                }
            }
        }
        (phase, reason)
    }

    /// The current state (see [`Health::now`]).
    pub fn state(&self) -> State {
        self.now().0
    }

    /// The current reason (see [`Health::now`]).
    pub fn reason(&self) -> String {
        self.now().1
    }

    /// Ready: active or on standby, connected to Kafka, and no batch
    /// waiting on it for [`STALLED_AFTER`] or longer.
    pub fn is_ready(&self) -> bool {
        matches!(self.state(), State::Active | State::Standby)
    }
}

/// The phase of a relay with no partition to claim from, its lease
/// heartbeat working: starting before its first lease (or while partitions
/// change hands), on standby once other live relays own every partition.
pub(crate) fn idle_phase(partitions: i32, owned: usize, live_relays: i32) -> (State, String) {
    if partitions == 0 {
        (
            State::Starting,
            "waiting for its share of the outbox partitions".into(),
        )
    } else if owned == 0 && live_relays > 1 {
        (
            State::Standby,
            format!(
                "the {} other relays own all {partitions} partitions; ready to take over",
                live_relays - 1
            ),
        )
    } else {
        (
            State::Starting,
            format!("handing over or taking over partitions (owns {owned} of {partitions})"),
        )
    }
}

/// The reason of an active relay.
pub(crate) fn active_reason(owned: usize, partitions: i32) -> String {
    format!("publishing; owns {owned} of {partitions} outbox partitions")
}

/// Records awaiting acknowledgement, see [`Health::awaiting`].
pub(crate) struct Awaiting<'a>(&'a Health);

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        *self.0.awaiting.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_only_when_other_live_relays_own_every_partition() {
        // Before the first lease: starting, not standby.
        assert_eq!(idle_phase(0, 0, 0).0, State::Starting);
        assert_eq!(idle_phase(0, 0, 3).0, State::Starting);
        // Alone and owning nothing: partitions are changing hands.
        assert_eq!(idle_phase(32, 0, 1).0, State::Starting);
        let (state, reason) = idle_phase(32, 0, 3);
        assert_eq!(state, State::Standby);
        assert_eq!(
            reason,
            "the 2 other relays own all 32 partitions; ready to take over"
        );
    }

    #[test]
    fn ready_needs_a_connected_broker_and_no_stalled_batch() {
        let reach = Arc::new(Reach::default());
        let health = Health::new(Arc::clone(&reach));
        health.set(State::Active, active_reason(32, 32));
        // Not heard from Kafka yet.
        assert_eq!(health.state(), State::Starting);
        reach.up();
        assert!(health.is_ready());
        assert_eq!(
            health.reason(),
            "publishing; owns 32 of 32 outbox partitions"
        );
        // A batch sent long ago and not acknowledged.
        *health.awaiting.lock().unwrap() = Some((Instant::now() - STALLED_AFTER, 10));
        assert_eq!(health.state(), State::Degraded);
        assert!(
            health.reason().contains("10 records sent"),
            "{}",
            health.reason()
        );
        {
            let _fresh = health.awaiting(10);
            assert!(health.is_ready(), "a fresh batch is fine");
        }
        assert!(health.is_ready(), "acknowledged");
        health.set(State::Stopping, "shutting down");
        assert!(!health.is_ready());
    }
}
