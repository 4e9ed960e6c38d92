//! [`Reach`]: whether a Kafka client is connected to a broker *now*, for
//! readiness probes that must not lie.
//!
//! A delivery report says a broker is gone only when a record times out, up
//! to `message.timeout.ms` later, and an idle client sends nothing at all.
//! librdkafka knows sooner: it reports the state of every broker connection
//! in its statistics (`statistics.interval.ms`, which [`WatchedContext`]
//! users set to [`STATS_INTERVAL_MS`]), and raises a global `AllBrokersDown`
//! error as soon as the last connection drops. [`WatchedContext`] feeds both
//! into a [`Reach`]:
//!
//! ```text
//!   statistics: some broker UP/UPDATE ──────────────► Up
//!   statistics: no broker UP, or AllBrokersDown ────► Down { since, why }
//!   nothing heard yet ──────────────────────────────► NotYet
//! ```
//!
//! One connected broker is enough to be `Up`: librdkafka opens connections
//! only to the brokers it needs, so the others may well be idle. A leader
//! that is down while others are up shows as records waiting for their
//! acknowledgement, which the relay watches itself.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rdkafka::{
    client::ClientContext, config::RDKafkaLogLevel, error::KafkaError, statistics::Statistics,
    types::RDKafkaErrorCode,
};

use crate::logs::{librdkafka_error, librdkafka_log};

/// The statistics interval clients with a [`WatchedContext`] should use
/// (`statistics.interval.ms`), in milliseconds: how stale [`Reach`] may be.
pub const STATS_INTERVAL_MS: &str = "1000";

/// A client's connection to the cluster, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Connection {
    /// Nothing heard from librdkafka yet (it is still connecting).
    NotYet,
    /// Connected to at least one broker.
    Up,
    /// Connected to none, for `down_for`, with librdkafka's account of why.
    Down {
        /// Since when no broker has been connected.
        down_for: Duration,
        /// The broker connection states, or librdkafka's error.
        why: String,
    },
}

#[derive(Debug)]
enum Seen {
    NotYet,
    Up,
    Down { since: Instant, why: String },
}

/// Whether a client is connected to any broker, updated by
/// [`WatchedContext`]. Cheap to read: one lock, no I/O.
#[derive(Debug)]
pub struct Reach {
    seen: Mutex<Seen>,
}

impl Default for Reach {
    fn default() -> Self {
        Self {
            seen: Mutex::new(Seen::NotYet),
        }
    }
}

impl Reach {
    /// The connection as last seen.
    pub fn now(&self) -> Connection {
        match &*self.lock() {
            Seen::NotYet => Connection::NotYet,
            Seen::Up => Connection::Up,
            Seen::Down { since, why } => Connection::Down {
                down_for: since.elapsed(),
                why: why.clone(),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a broker answered (a delivery report, say): connected.
    /// Without statistics this is how the end of an outage is seen.
    pub fn up(&self) {
        *self.lock() = Seen::Up;
    }

    /// Records that the other side is unreachable; keeps the start of an
    /// outage already seen, and takes the latest reason.
    pub fn down(&self, why: String) {
        let mut seen = self.lock();
        let since = match &*seen {
            Seen::Down { since, .. } => *since,
            _ => Instant::now(),
        };
        *seen = Seen::Down { since, why };
    }

    /// Reads the broker states of one statistics report (for a client with
    /// its own context; [`WatchedContext`] calls it itself).
    pub fn saw(&self, stats: &Statistics) {
        let brokers: Vec<_> = stats
            .brokers
            .values()
            .filter(|b| b.source != "internal" && b.source != "logical")
            .collect();
        if brokers
            .iter()
            .any(|b| b.state == "UP" || b.state == "UPDATE")
        {
            self.up();
        } else if !brokers.is_empty() {
            let mut states: Vec<String> = brokers
                .iter()
                .map(|b| format!("{} {}", b.nodename, b.state))
                .collect();
            states.sort();
            states.dedup();
            self.down(format!("no broker connected ({})", states.join(", ")));
        }
    }
}

impl Reach {
    /// Reads a global client error: `AllBrokersDown` means down.
    pub fn saw_error(&self, error: &KafkaError) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            // librdkafka's own words ("0/1 brokers are down") can count a
            // broker in the middle of reconnecting; statistics name them.
            self.down("all broker connections are down".into());
        }
    }
}

/// A client context that keeps a [`Reach`] up to date, and otherwise
/// behaves as [`crate::QuietContext`]: librdkafka's logs and errors said
/// once, repeats summarised.
///
/// Set `statistics.interval.ms` to [`STATS_INTERVAL_MS`] on the client;
/// without statistics only `AllBrokersDown` reaches the [`Reach`], and it
/// never leaves [`Connection::NotYet`] until then.
#[derive(Debug, Clone, Default)]
pub struct WatchedContext {
    reach: Arc<Reach>,
}

impl WatchedContext {
    /// A context that updates `reach`: a client that replaces another keeps
    /// reporting to the same place.
    pub fn new(reach: Arc<Reach>) -> Self {
        Self { reach }
    }

    /// The [`Reach`] this context updates.
    pub fn reach(&self) -> Arc<Reach> {
        Arc::clone(&self.reach)
    }
}

impl ClientContext for WatchedContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        librdkafka_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.reach.saw_error(&error);
        librdkafka_error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        self.reach.saw(&statistics);
    }
}

impl rdkafka::consumer::ConsumerContext for WatchedContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_keeps_its_start_and_ends_when_a_broker_is_up() {
        let reach = Reach::default();
        assert_eq!(reach.now(), Connection::NotYet);
        reach.down("first".into());
        std::thread::sleep(Duration::from_millis(20));
        reach.down("second".into());
        match reach.now() {
            Connection::Down { down_for, why } => {
                assert!(down_for >= Duration::from_millis(20), "{down_for:?}");
                assert_eq!(why, "second");
            }
            other => panic!("{other:?}"),
        }
        reach.up();
        assert_eq!(reach.now(), Connection::Up);
    }
}
